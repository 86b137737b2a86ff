"""The edge runner on an emulated Raspberry Pi: arm64 Debian userland (``.ci/pi-rootfs.sh``), proot
with qemu-aarch64 as a fake Cortex-A72, the aarch64 ai-edge-litert wheel. ``--validate`` must pass
on the INT8 ``.tflite`` and the predictions must be those of x86; a head update must rebuild the
pipeline's file there byte for byte.

Skipped where the rootfs has not been built (``make pi-rootfs``), unless TRASHSORT_REQUIRE_PI=1 (CI).
Emulated timings are not device latencies and are not reported anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge import classify

REPO = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get("TRASHSORT_PI_ROOT", Path.home() / ".cache" / "trashsort" / "pi-rootfs"))
READY = (ROOT / ".trashsort-stamp").is_file() and shutil.which("proot") and shutil.which("qemu-aarch64-static")

if not READY and os.environ.get("TRASHSORT_REQUIRE_PI") == "1":
    raise RuntimeError(f"{ROOT}: no emulated Pi rootfs (bash .ci/pi-rootfs.sh), but TRASHSORT_REQUIRE_PI=1")
pytestmark = pytest.mark.skipif(not READY, reason=f"no emulated Pi at {ROOT}: run `make pi-rootfs`")


def run_on_pi(bundle: Path, *args: str, previous: Path | None = None) -> subprocess.CompletedProcess:
    """edge/classify.py on the emulated Pi, ``bundle`` as /work/bundle (``previous`` as /work/previous)."""
    command = [
        "proot", "-q", "qemu-aarch64-static", "-r", str(ROOT),
        "-b", f"{REPO / 'edge'}:/work/edge", "-b", f"{bundle}:/work/bundle",
        *(["-b", f"{previous}:/work/previous"] if previous else []),
        "-b", f"{ROOT / 'opt/cpuinfo-cortex-a72'}:/proc/cpuinfo",
        "-b", f"{ROOT / 'opt/cpu-list'}:/sys/devices/system/cpu/possible",
        "-b", f"{ROOT / 'opt/cpu-list'}:/sys/devices/system/cpu/present",
        "-w", "/work", "/usr/bin/env", "PYTHONPATH=/opt/edge-site", "python3", "/work/edge/classify.py",
        "--bundle", "/work/bundle", *args,
    ]
    env = {**os.environ, "QEMU_CPU": "cortex-a72"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_int8_tflite_validates_on_an_emulated_pi_and_agrees_with_x86(exported, tmp_path: Path, capsys) -> None:
    bundle = Path(shutil.copytree(exported["result"].path, tmp_path / "bundle"))
    done = run_on_pi(bundle, "--validate", "--model", "model_int8.tflite", "--json", "--threads", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["machine"] == "Linux aarch64" and report["passed"], report
    assert "XNNPACK" in done.stderr  # the Arm kernels ran, not a reference fallback

    done = run_on_pi(bundle, "--model", "model_int8.tflite", "--json", "--top-k", "3", "/work/bundle/golden")
    assert done.returncode == 0, done.stderr
    on_pi = [json.loads(line) for line in done.stdout.splitlines()]
    assert classify.main(["--bundle", str(bundle), "--model", "model_int8.tflite", "--json", "--top-k", "3",
                          str(bundle / "golden")]) == 0
    on_x86 = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(on_pi) == len(on_x86) == len(list((bundle / "golden").glob("*.png")))
    for pi, x86 in zip(on_pi, on_x86):
        assert Path(pi["source"]).name == Path(x86["source"]).name
        assert pi["label"] == x86["label"]
        assert [k["label"] for k in pi["top_k"]] == [k["label"] for k in x86["top_k"]]
        assert abs(pi["confidence"] - x86["confidence"]) <= 0.02


def test_head_update_is_rebuilt_on_an_emulated_pi(exported, tmp_path: Path) -> None:
    """A new class list sent as a head update: the Pi rebuilds both .tflite files (fp32 and INT8) from
    its own, byte for byte, and validates the INT8 one (the runner's first choice)."""
    from tests.test_head import cli, photos

    bundle = exported["result"].path
    battery = photos(tmp_path / "battery", 12, (200, 30, 30))
    done = cli("add-class", "--from", str(bundle), "--images", str(battery), "--runs", str(tmp_path / "runs"),
               "--out", str(tmp_path / "dist"), "--formats", "tflite", "--calibration", "24", "--quiet")
    assert done.exit_code == 0, done.output
    (new_bundle,) = (tmp_path / "dist").iterdir()
    update = Path(shutil.copytree(new_bundle, tmp_path / "update", ignore=shutil.ignore_patterns("*.tflite")))

    done = run_on_pi(update, "--head-update-from", "/work/previous", "--validate", "--json", previous=bundle)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["machine"] == "Linux aarch64" and report["passed"], report
    assert report["artefact"] == "model_int8.tflite", report
    for name in ("model_fp32.tflite", "model_int8.tflite"):
        assert (update / name).read_bytes() == (new_bundle / name).read_bytes()
