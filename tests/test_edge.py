"""The edge runner: torch-free runs, preprocessing parity with the pipeline, each backend on a tiny
bundle, file/video/camera sources (cameras through injected fakes), --validate passing and failing,
camera loss, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge import classify, sources
from edge.bundle import read_manifest
from edge.preprocess import load_rgb, model_input
from edge.runtimes import RuntimeMissing, captured_output, choose_artefact
from edge.validate import validate_bundle
from pipeline import data as data_mod
from pipeline.manifest import Preprocess

REPO = Path(__file__).resolve().parent.parent
CLASSIFY = REPO / "edge" / "classify.py"
TRASHNET = REPO.parent / "shared" / "datasets" / "trashnet"


@pytest.fixture
def bundle(exported, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle, free to tamper with."""
    return Path(shutil.copytree(exported["result"].path, tmp_path / "bundle"))


def golden_files(bundle: Path) -> list[Path]:
    expected = json.loads((bundle / "golden" / "expected.json").read_text())
    return [bundle / "golden" / item["file"] for item in expected["images"]]


def run_classify(*args: str, block_torch: bool = False) -> subprocess.CompletedProcess:
    """``python edge/classify.py ARGS`` in a fresh interpreter; optionally with torch (and the
    pipeline) made unimportable, and a check at exit that torch was never loaded."""
    prelude = ""
    if block_torch:
        prelude = (
            "import sys, atexit\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision', 'timm', 'pipeline'):\n"
            "            raise ImportError('blocked in this test: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "atexit.register(lambda: print('TORCH LOADED' if 'torch' in sys.modules else 'torch-free',"
            " file=sys.stderr))\n")
    code = prelude + f"import runpy, sys\nsys.argv = {['classify.py', *args]!r}\n" \
                     f"runpy.run_path({str(CLASSIFY)!r}, run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


# --- torch-free ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_runs_without_torch(bundle: Path, backend: str) -> None:
    done = run_classify("--bundle", str(bundle), "--backend", backend, "--validate", "--json",
                        str(bundle / "golden"), block_torch=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("torch-free")
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[0])
    assert report["passed"] and report["artefact"].endswith(".tflite" if backend == "tflite" else ".onnx")
    assert len(lines) == 1 + len(golden_files(bundle))  # then one prediction per golden photo


# --- preprocessing parity -------------------------------------------------------------------------

def photos_of_every_kind(folder: Path) -> list[Path]:
    """Real TrashNet photos (when ../shared is there) and generated ones of odd sizes and modes."""
    folder.mkdir(parents=True)
    paths = sorted(TRASHNET.glob("*/*1.jpg"))[:4] if TRASHNET.is_dir() else []
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (301, 457, 3), dtype=np.uint8))
    kinds = {
        "rgb_wide.jpg": base, "rgb_tall.png": base.transpose(Image.Transpose.ROTATE_90),
        "grey.png": base.convert("L"), "palette.png": base.convert("P"),
        "rgba.png": base.convert("RGBA"), "cmyk.jpg": base.convert("CMYK"),
        "small_square.png": base.resize((230, 230)), "odd.bmp": base.resize((261, 397)),
    }
    for name, img in kinds.items():
        img.save(folder / name)
        paths.append(folder / name)
    deep = np.asarray(base.convert("L"), dtype=np.uint16) * 257  # 16-bit grey
    Image.fromarray(deep).save(folder / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the decoder must turn it upright
    base.save(folder / "exif_rotated.jpg", exif=exif)
    return [*paths, folder / "grey16.png", folder / "exif_rotated.jpg"]


@pytest.mark.parametrize("size", [224, 32])
def test_preprocessing_is_identical_to_the_pipeline(tmp_path: Path, size: int) -> None:
    preprocess = Preprocess(size=[size, size])
    paths = photos_of_every_kind(tmp_path / "photos")
    samples = [data_mod.Sample(p, 0, "val") for p in paths]
    decoded = data_mod.decode_split(samples, preprocess.resize_shorter_to, preprocess.interpolation, size,
                                    cache_dir=tmp_path / "cache")
    assert decoded.skipped == []
    pipeline_inputs = data_mod.center_crops(decoded.images, size)
    manifest_preprocess = asdict(preprocess)
    for path, expected in zip(paths, pipeline_inputs):
        edge_input = model_input(load_rgb(path), manifest_preprocess)
        assert edge_input.dtype == np.uint8 and edge_input.shape == (size, size, 3)
        assert np.array_equal(edge_input, expected), path.name


# --- backends ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["model_fp32.tflite", "model_int8.tflite", "model_fp32.pte",
                                   "model_int8.pte", "model_fp32.onnx", "model_int8.onnx"])
def test_each_backend_reproduces_the_exported_golden_answers(bundle: Path, model: str) -> None:
    classifier = classify.Classifier(bundle, model=model, threads=1)
    expected = json.loads((bundle / "golden" / "expected.json").read_text())["artefacts"][model]
    for path, probs in zip(golden_files(bundle), expected):
        prediction = classifier.classify(sources.Frame(str(path), np.asarray(load_rgb(path))), top_k=2)
        assert prediction.label == classifier.classes[int(np.argmax(probs))]["name"]
        assert prediction.confidence == pytest.approx(max(probs), abs=1e-4)
        assert len(prediction.top_k) == 2 and prediction.latency_ms > 0


def test_artefact_choice_follows_installed_runtimes(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    assert choose_artefact(manifest, formats=["tflite", "onnx"])["file"] == "model_int8.tflite"
    assert choose_artefact(manifest, formats=["onnx"])["file"] == "model_int8.onnx"
    assert choose_artefact(manifest, backend="executorch", formats=FORMATS_ALL)["file"] == "model_int8.pte"
    assert choose_artefact(manifest, model="model_fp32.onnx")["format"] == "onnx"
    with pytest.raises(RuntimeMissing, match="backend 'executorch'"):
        choose_artefact(manifest, backend="executorch", formats=["tflite"])
    with pytest.raises(LookupError, match="nope.tflite: not an artefact"):
        choose_artefact(manifest, model="nope.tflite")
    manifest["artefacts"] = [a for a in manifest["artefacts"] if a["format"] != "tflite"]
    with pytest.raises(LookupError, match="no artefact for the runtimes installed here"):
        choose_artefact(manifest, formats=["tflite"])


FORMATS_ALL = ["tflite", "executorch", "onnx"]


# --- sources ---------------------------------------------------------------------------------------

def test_files_folders_globs_and_unreadable_images(bundle: Path, tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in golden_files(bundle)[:3]:
        shutil.copy(path, photos / path.name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "notes.txt").write_text("not an image, not listed")
    status = classify.main(["--bundle", str(bundle), "--model", "model_fp32.onnx", "--json", str(photos),
                            str(golden_files(bundle)[3]), str(bundle / "golden" / "*_*.png")])
    out, err = capsys.readouterr()
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 3 + 1 + len(golden_files(bundle))  # folder (broken skipped) + file + glob
    assert "skipped" in err and "broken.jpg" in err and "notes.txt" not in err
    assert classify.main(["--bundle", str(bundle), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg: no such file or folder" in capsys.readouterr().err


def test_video_file_every_nth_frame_and_saved_annotations(bundle: Path, tmp_path: Path, capsys) -> None:
    import cv2

    video = tmp_path / "clip.avi"
    frames = [np.asarray(load_rgb(p).resize((64, 48))) for p in golden_files(bundle)]  # even sizes for MJPG
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for rgb in frames:
        writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    writer.release()
    status = classify.main(["--bundle", str(bundle), "--model", "model_fp32.tflite", str(video), "--every", "2",
                            "--save", str(tmp_path / "saved"), "--min-confidence", "0.999"])
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [line.split(":")[0] for line in out] == [f"{video}#{i}" for i in range(0, len(frames), 2)]
    assert all("uncertain (" in line and line.endswith(" ms") for line in out)  # nothing is 99.9 % sure
    saved = sorted((tmp_path / "saved").glob("*.jpg"))
    assert len(saved) == len(out) and Image.open(saved[0]).size == (64, 48)


class FakePicamera2:
    """picamera2's API as used: configure/start/capture_array/stop/close; frames in BGR order."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames, self.config, self.closed = list(frames), None, False

    def create_preview_configuration(self, main: dict) -> dict:
        return {"main": main}

    def configure(self, config: dict) -> None:
        self.config = config

    def start(self) -> None:
        pass

    def capture_array(self) -> np.ndarray:
        return self.frames.pop(0)[..., ::-1].copy()  # "RGB888" is B, G, R in memory

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_picamera_source_through_the_cli(bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    frames = [np.asarray(load_rgb(p)) for p in golden_files(bundle)]
    camera = FakePicamera2(frames)
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=lambda: camera))
    status = classify.main(["--bundle", str(bundle), "--model", "model_fp32.onnx", "--camera", "picamera",
                            "--max-frames", "4", "--json"])
    assert status == 0 and camera.closed and camera.config["main"]["format"] == "RGB888"
    got = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    expected = json.loads((bundle / "golden" / "expected.json").read_text())["artefacts"]["model_fp32.onnx"]
    names = [c["name"] for c in read_manifest(bundle)["classes"]]
    assert got == [names[int(np.argmax(p))] for p in expected[:4]]  # colours right: BGR was flipped


class FakeCapture:
    """cv2.VideoCapture as a USB camera: BGR frames, then (optionally) nothing: unplugged."""

    def __init__(self, frames: list[np.ndarray], opened: bool = True) -> None:
        self.frames, self.opened, self.released = list(frames), opened, 0

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if not self.frames:
            return False, None
        return True, self.frames.pop(0)[..., ::-1].copy()

    def release(self) -> None:
        self.released += 1


def test_usb_camera_frames_are_rgb_and_every_nth() -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red
    capture = FakeCapture([rgb] * 6)
    frames = list(sources.camera_frames("usb:0", lambda: sources.OpenCVDevice(0, capture), every=2,
                                        max_frames=3))
    assert [f.source for f in frames] == ["usb:0#0", "usb:0#2", "usb:0#4"]
    assert all(f.image[0, 0].tolist() == [200, 0, 0] for f in frames)


def test_camera_lost_mid_run_retries_then_exits_cleanly(bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys) -> None:
    frames = [np.asarray(load_rgb(p)) for p in golden_files(bundle)[:2]]
    opened = []

    def fake_cv2_capture(index: int) -> FakeCapture:
        opened.append(index)  # first open gives two frames, every reopen finds nothing
        return FakeCapture(frames if len(opened) == 1 else [], opened=len(opened) == 1)

    monkeypatch.setattr(sources, "_cv2", lambda: types.SimpleNamespace(VideoCapture=fake_cv2_capture))
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    status = classify.main(["--bundle", str(bundle), "--model", "model_fp32.tflite", "--camera", "usb:1"])
    out, err = capsys.readouterr()
    assert status == 3
    assert len(out.splitlines()) == 2  # the frames before the loss were classified
    assert err.count("retrying") == 3 and "gave up after 3 retries" in err and "Traceback" not in err
    assert opened == [1, 1, 1, 1]


def test_camera_recovers_after_a_dropout() -> None:
    good = np.zeros((4, 4, 3), np.uint8)
    devices = [FakeCapture([good]), FakeCapture([good, good])]  # the first drops after one frame
    frames = list(sources.camera_frames("usb:0", lambda: sources.OpenCVDevice(0, devices.pop(0)),
                                        max_frames=3, sleep=lambda s: None))
    assert len(frames) == 3


def test_missing_camera_is_a_clear_error(bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # not installed
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    assert classify.main(["--bundle", str(bundle), "--camera", "picamera"]) == 3
    assert "picamera2 is not installed" in capsys.readouterr().err
    assert classify.main(["--bundle", str(bundle), "--camera", "webcam"]) == 2
    assert "expected picamera, usb or usb:N" in capsys.readouterr().err


# --- validation ------------------------------------------------------------------------------------

def test_validate_passes_on_a_good_bundle(bundle: Path, capsys) -> None:
    for model in ("model_int8.tflite", "model_fp32.pte"):
        report = validate_bundle(bundle, next(a for a in read_manifest(bundle)["artefacts"] if a["file"] == model),
                                 threads=1, latency_runs=50)
        assert report.passed, report.text()
        assert [c.name for c in report.checks] == ["sha256", "tensors", "golden inputs", "golden outputs"]
        assert report.latency["runs"] >= 50 and report.latency["p90_ms"] >= report.latency["median_ms"] > 0
        golden = report.golden
        assert golden["count"] == len(golden_files(bundle))
        assert golden["max_prob_diff"] <= golden["tolerance"]["max_prob_diff"]
        if model.endswith("fp32.pte"):
            assert golden["agreement"] == 1.0 and golden["max_prob_diff"] < 1e-4  # same runtime, same CPU
    assert classify.main(["--bundle", str(bundle), "--validate", "--model", "model_int8.onnx"]) == 0
    assert capsys.readouterr().out.strip().endswith("RESULT: PASS")


def test_a_pte_run_prints_only_its_own_lines(bundle: Path) -> None:
    """torchao's import-time "Failed to load ... .so" and "no triton" logs, torch's deprecation
    about one of torchao's enums and XNNPACK's CPU probing are not ours to show."""
    done = run_classify("--bundle", str(bundle), "--model", "model_fp32.pte", "--validate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("RESULT: PASS")
    for noise in ("Failed to load", "triton", "cpuinfo", "Enum subclass"):
        assert noise not in done.stdout + done.stderr, noise


def test_quieting_executorch_twice_adds_nothing_more() -> None:
    import logging

    from edge.runtimes import quiet_executorch_imports

    quiet_executorch_imports()
    filters = list(logging.getLogger("torch.utils._pytree").filters)
    quiet_executorch_imports()  # every ExecuTorchRunner calls it
    assert logging.getLogger("torch.utils._pytree").filters == filters and filters
    assert logging.getLogger("torchao.kernel.intmm").getEffectiveLevel() == logging.ERROR


def test_captured_output_replays_only_on_failure_and_closes_its_copies(capfd) -> None:
    open_fds = len(os.listdir("/proc/self/fd"))
    with captured_output():
        os.write(2, b"native chatter\n")
    with pytest.raises(RuntimeError, match="boom"), captured_output():
        os.write(2, b"the converter said why\n")
        raise RuntimeError("boom")
    assert len(os.listdir("/proc/self/fd")) == open_fds
    err = capfd.readouterr().err
    assert "native chatter" not in err and "the converter said why" in err


def test_validate_fails_on_a_tampered_artefact_before_running_it(bundle: Path, capsys) -> None:
    path = bundle / "model_int8.tflite"
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    assert classify.main(["--bundle", str(bundle), "--validate", "--model", "model_fp32.onnx", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"] and [c["name"] for c in report["checks"]] == ["sha256"]
    assert "model_int8.tflite: sha256 differs" in report["checks"][0]["detail"]
    # Classifying refuses too, before any inference.
    assert classify.main(["--bundle", str(bundle), str(golden_files(bundle)[0])]) == 2
    assert "sha256 differs" in capsys.readouterr().err


def test_validate_fails_on_wrong_golden_expectations(bundle: Path, capsys) -> None:
    expected_path = bundle / "golden" / "expected.json"
    expected = json.loads(expected_path.read_text())
    expected["artefacts"]["model_fp32.tflite"] = [p[::-1] for p in expected["artefacts"]["model_fp32.tflite"]]
    expected_path.write_text(json.dumps(expected))
    assert classify.main(["--bundle", str(bundle), "--validate", "--model", "model_fp32.tflite"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  golden outputs" in out and out.strip().endswith("RESULT: FAIL")


def test_validate_fails_when_preprocessing_differs(bundle: Path, capsys) -> None:
    golden = golden_files(bundle)[0]
    pixels = np.asarray(Image.open(golden)).copy()
    pixels[pixels.shape[0] // 2, pixels.shape[1] // 2] ^= 1  # one pixel in the crop
    Image.fromarray(pixels).save(golden)
    assert classify.main(["--bundle", str(bundle), "--validate", "--model", "model_fp32.onnx"]) == 1
    assert f"preprocessing differs from the export's on ['{golden.name}']" in capsys.readouterr().out


def test_manifest_that_does_not_match_the_model_is_refused(bundle: Path, capsys) -> None:
    manifest = read_manifest(bundle)
    manifest["classes"].append({"id": 3, "name": "battery", "stream": None})  # 4 classes, model has 3
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    photo = str(golden_files(bundle)[0])
    assert classify.main(["--bundle", str(bundle), "--model", "model_fp32.onnx", photo]) == 2
    assert "not [1, 4] (one score per class)" in capsys.readouterr().err
    assert classify.main(["--bundle", str(bundle), "--validate", "--model", "model_fp32.onnx"]) == 1
    assert "FAIL  tensors" in capsys.readouterr().out
    assert classify.main(["--bundle", str(bundle.parent / "nowhere"), "--validate"]) == 2
    assert "no manifest" in capsys.readouterr().err
