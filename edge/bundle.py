"""Read and check a bundle on any device: the standard library only (no torch, no numpy).

The bundle's ``manifest.json`` is the one source of classes and of each artefact's hash; this is the
check every consumer runs before inference (the export pipeline after writing, the edge runner on a
device), so it lives here, where both can import it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class BundleInvalid(ValueError):
    """A bundle whose files do not match its manifest; the message names each problem."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise BundleInvalid(f"{path}: no manifest (is {bundle} a bundle folder?)") from None
    except OSError as e:
        raise BundleInvalid(f"{path}: cannot read the manifest ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise BundleInvalid(f"{path}: not valid JSON ({e})") from None


def artefact_problems(bundle: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Every artefact that is missing, of the wrong size, or whose sha256 differs from the manifest."""
    problems = []
    for entry in manifest.get("artefacts", []):
        path = Path(bundle) / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (damaged or replaced)")
        head = entry.get("head_update")  # the classifier weights a device can rebuild it from
        if head and (not (Path(bundle) / head["file"]).is_file()
                     or sha256_file(Path(bundle) / head["file"]) != head["sha256"]):
            problems.append(f"{Path(bundle) / head['file']}: missing, or its sha256 differs from the manifest")
    return problems


def verify(bundle: str | Path) -> dict[str, Any]:
    """The bundle's manifest, after checking every artefact against it; raises BundleInvalid."""
    manifest = read_manifest(bundle)
    problems = artefact_problems(bundle, manifest)
    if problems:
        raise BundleInvalid("; ".join(problems))
    return manifest


def input_contract_problems(io: dict[str, Any], size: list[int], num_classes: int) -> list[str]:
    """Where an artefact's input/output tensors differ from the contract: one uint8 RGB NHWC photo of
    ``size`` in (or int8 holding ``pixel - 128``, a full-integer model's), one score per class out."""
    height, width = size
    problems = []
    if len(io["inputs"]) != 1 or len(io["outputs"]) != 1:
        return [f"{len(io['inputs'])} inputs and {len(io['outputs'])} outputs, the contract has one of each"]
    (inp,), (out,) = io["inputs"], io["outputs"]
    if [int(s) for s in inp["shape"]] != [1, height, width, 3]:
        problems.append(f"input shape {inp['shape']} is not [1, {height}, {width}, 3]")
    quant = inp.get("quantization")
    raw_bytes = inp["dtype"] == "uint8" or (
        inp["dtype"] == "int8" and quant == {"scale": 1.0, "zero_point": -128})
    if not raw_bytes:
        problems.append(f"input {inp['dtype']} {quant} does not take the contract's uint8 pixels")
    if [int(s) for s in out["shape"]] != [1, num_classes]:
        problems.append(f"output shape {out['shape']} is not [1, {num_classes}] (one score per class)")
    return problems
