"""A new classifier head for a ``.tflite`` already on the device: a head update instead of a model.

A head change (``trashsort add-class`` and friends) leaves every op but the last as it was. The
pipeline therefore writes the new head into the previous bundle's fp32 ``.tflite``
(``with_new_head``), and the new bundle records where it came from: its manifest entry's
``head_update`` holds the sha256 of the previous file and names ``head_fp32.bin`` (the new weight
then bias, little-endian float32; a few KB to a few tens of KB). A device that has the previous
bundle needs the new bundle without that ``.tflite``, and rebuilds it here byte for byte
(``apply_head_update``; ``edge/classify.py --head-update-from OLD_BUNDLE``): the rebuilt file must
hash to the new manifest's sha256, or nothing is written.

numpy and ai-edge-litert only (no torch), like the rest of ``edge/``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import BundleInvalid, read_manifest, sha256_file
from edge.runtimes import RuntimeMissing

HEAD_FILE = "head_fp32.bin"


def float32_bytes(values: np.ndarray) -> bytes:
    """Little-endian float32, as both the head file and a .tflite buffer store weights."""
    return np.ascontiguousarray(values, "<f4").tobytes()


def head_bytes(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """The head file's content: weight (classes x features) then bias."""
    return float32_bytes(weight) + float32_bytes(bias)


def read_head(path: Path, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    classes, features = shape
    values = np.frombuffer(path.read_bytes(), dtype="<f4")
    if values.size != classes * (features + 1):
        raise BundleInvalid(f"{path}: {values.size} values, the manifest's head shape {shape} needs "
                            f"{classes * (features + 1)}")
    return values[:classes * features].reshape(classes, features), values[classes * features:]


def apply_head_update(bundle: str | Path, previous: str | Path) -> list[str]:
    """Rebuild ``bundle``'s missing head-updated artefacts from ``previous``'s; the files written."""
    bundle, previous = Path(bundle), Path(previous)
    written = []
    for entry in read_manifest(bundle).get("artefacts", []):
        update: dict[str, Any] | None = entry.get("head_update")
        target = bundle / entry["file"]
        if update is None or target.is_file():
            continue
        source = previous / entry["file"]
        if not source.is_file() or sha256_file(source) != update["from_sha256"]:
            raise BundleInvalid(f"{source}: not the artefact this head update was made from (sha256 "
                                f"{update['from_sha256'][:16]}...); copy the full {entry['file']} instead")
        head_path = bundle / update["file"]
        if not head_path.is_file() or sha256_file(head_path) != update["sha256"]:
            raise BundleInvalid(f"{head_path}: missing or its sha256 differs from the manifest")
        weight, bias = read_head(head_path, update["shape"])
        rebuilt = with_new_head(source.read_bytes(), weight, bias)
        if rebuilt is None or hashlib.sha256(rebuilt).hexdigest() != entry["sha256"]:
            raise BundleInvalid(f"{target}: the rebuilt artefact does not match the manifest's sha256 "
                                f"(another ai-edge-litert version?); copy the full {entry['file']} instead")
        temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
        temporary.write_bytes(rebuilt)
        temporary.replace(target)
        written.append(entry["file"])
    return written


def with_new_head(flatbuffer: bytes, weight: np.ndarray, bias: np.ndarray) -> bytes | None:
    """The fp32 ``.tflite`` with the weight and bias of its last op, a fully-connected classifier,
    replaced (any number of classes); None if the graph does not end in one that fits.

    A head change leaves the rest of the graph as it was, and the conversion this skips is most of
    a head change's time. The writer is deterministic (pure-Python flatbuffers); the pipeline gates
    the result like any export, and a device checks its sha256."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise RuntimeMissing("a head update needs ai-edge-litert (pip install ai-edge-litert)") from None

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    if len(model.subgraphs) != 1 or len(graph.outputs) != 1:
        return None
    output = int(graph.outputs[0])
    producers = [op for op in graph.operators if output in list(op.outputs)]
    if len(producers) != 1 or len(producers[0].inputs) != 3:
        return None
    op = producers[0]
    code = model.operatorCodes[op.opcodeIndex]
    if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.FULLY_CONNECTED:
        return None
    _, weight_index, bias_index = (int(i) for i in op.inputs)
    if bias_index < 0:  # the converter drops an all-zero bias: give the op one again
        bias_index = op.inputs[2] = _new_tensor(model, graph, "classifier_bias", schema.TensorType.FLOAT32)
    weight_tensor, bias_tensor = graph.tensors[weight_index], graph.tensors[bias_index]
    classes = len(bias)
    fits = (weight_tensor.type == bias_tensor.type == schema.TensorType.FLOAT32
            and len(weight_tensor.shape) == 2 and weight_tensor.shape[1] == weight.shape[1]
            and list(graph.tensors[output].shape) == [1, weight_tensor.shape[0]] and weight.shape[0] == classes)
    shared = [t for t in graph.tensors if t.buffer in (weight_tensor.buffer, bias_tensor.buffer)]
    if not fits or len(shared) != 2:
        return None
    for tensor, values in ((weight_tensor, weight), (bias_tensor, bias)):
        tensor.shape = np.array(values.shape, dtype=np.int32)
        model.buffers[tensor.buffer].data = np.frombuffer(float32_bytes(values), np.uint8)
    graph.tensors[output].shape = np.array([1, classes], dtype=np.int32)
    if graph.tensors[output].shapeSignature is not None:
        graph.tensors[output].shapeSignature = np.array([1, classes], dtype=np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _new_tensor(model, graph, name: str, dtype: int) -> int:
    """Append a constant tensor with its own (empty) buffer; its index."""
    from ai_edge_litert import schema_py_generated as schema

    model.buffers.append(schema.BufferT())
    tensor = schema.TensorT()
    tensor.name, tensor.type, tensor.buffer = name.encode(), dtype, len(model.buffers) - 1
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1
