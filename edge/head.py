"""A new classifier head for a ``.tflite`` already on the device: a head update instead of a model.

A head change (``trashsort add-class`` and friends) leaves every op but the last as it was. The
pipeline therefore writes the new head into the previous bundle's fp32 ``.tflite``
(``with_new_head``), and the new bundle records where it came from: its manifest entry's
``head_update`` holds the sha256 of the previous file and names ``head_fp32.bin`` (the new weight
then bias, little-endian float32; a few KB to a few tens of KB). A device that has the previous
bundle needs the new bundle without that ``.tflite``, and rebuilds it here byte for byte
(``apply_head_update``; ``edge/classify.py --head-update-from OLD_BUNDLE``): the rebuilt file must
hash to the new manifest's sha256, or nothing is written.

numpy only (no torch, no flatbuffers library), like the rest of ``edge/``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import BundleInvalid, read_manifest, sha256_file

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
                                f"(made by another trashsort version?); copy the full {entry['file']} instead")
        temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
        temporary.write_bytes(rebuilt)
        temporary.replace(target)
        written.append(entry["file"])
    return written


# The few fields of LiteRT's schema (tensorflow/compiler/mlir/lite/schema/schema.fbs) read here.
MODEL_OPERATOR_CODES, MODEL_SUBGRAPHS, MODEL_BUFFERS = 1, 2, 4
SUBGRAPH_TENSORS, SUBGRAPH_OUTPUTS, SUBGRAPH_OPERATORS = 0, 2, 3
TENSOR_SHAPE, TENSOR_TYPE, TENSOR_BUFFER, TENSOR_SHAPE_SIGNATURE = 0, 1, 2, 7
OPERATOR_OPCODE_INDEX, OPERATOR_INPUTS, OPERATOR_OUTPUTS = 0, 1, 2
OPCODE_DEPRECATED_BUILTIN, OPCODE_BUILTIN = 0, 3
BUFFER_DATA, BUFFER_OFFSET = 0, 1
FULLY_CONNECTED, FLOAT32 = 9, 0


class _Flatbuffer:
    """Read-only navigation of a flatbuffer: tables, their fields, vectors (little-endian)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.root = self._u32(0)

    def _u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.data, pos)[0]

    def field(self, table: int, index: int) -> int | None:
        """Where field ``index`` of the table at ``table`` is stored; None when absent."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        vtable_size = struct.unpack_from("<H", self.data, vtable)[0]
        if 4 + 2 * index >= vtable_size:
            return None
        offset = struct.unpack_from("<H", self.data, vtable + 4 + 2 * index)[0]
        return table + offset if offset else None

    def scalar(self, table: int, index: int, fmt: str) -> int:
        pos = self.field(table, index)
        return 0 if pos is None else struct.unpack_from(fmt, self.data, pos)[0]  # 0: the schema's default

    def _vector(self, table: int, index: int) -> int | None:
        pos = self.field(table, index)
        return None if pos is None else pos + self._u32(pos)

    def tables(self, table: int, index: int) -> list[int]:
        vector = self._vector(table, index)
        if vector is None:
            return []
        slots = (vector + 4 + 4 * k for k in range(self._u32(vector)))
        return [slot + self._u32(slot) for slot in slots]

    def ints(self, table: int, index: int) -> list[int]:
        vector = self._vector(table, index)
        if vector is None:
            return []
        return list(struct.unpack_from(f"<{self._u32(vector)}i", self.data, vector + 4))


def with_new_head(flatbuffer: bytes, weight: np.ndarray, bias: np.ndarray) -> bytes | None:
    """The fp32 ``.tflite`` with the weight and bias of its last op, a fully-connected classifier,
    replaced (any number of classes); None if the graph does not end in one that fits.

    A head change leaves the rest of the graph as it was, and the conversion this skips is most of
    a head change's time. Every byte of the previous file stays: the new weight, bias and shapes are
    appended and the fields that pointed at the old ones are re-pointed (a flatbuffer offset may
    point anywhere after itself), so the old head stays behind as unused bytes (a few tens of KB;
    a full export starts afresh). That is simple enough to do the same way on any device (the
    Android core's ``HeadUpdate.kt`` does), byte for byte, with no flatbuffers library; the
    pipeline gates the result like any export, and a device checks its sha256."""
    fb = _Flatbuffer(flatbuffer)
    graphs = fb.tables(fb.root, MODEL_SUBGRAPHS)
    if len(graphs) != 1 or len(fb.ints(graphs[0], SUBGRAPH_OUTPUTS)) != 1:
        return None
    graph = graphs[0]
    tensors, output = fb.tables(graph, SUBGRAPH_TENSORS), fb.ints(graph, SUBGRAPH_OUTPUTS)[0]
    producers = [op for op in fb.tables(graph, SUBGRAPH_OPERATORS) if output in fb.ints(op, OPERATOR_OUTPUTS)]
    if len(producers) != 1 or len(fb.ints(producers[0], OPERATOR_INPUTS)) != 3:
        return None
    op = producers[0]
    code = fb.tables(fb.root, MODEL_OPERATOR_CODES)[fb.scalar(op, OPERATOR_OPCODE_INDEX, "<I")]
    _, weight_index, bias_index = fb.ints(op, OPERATOR_INPUTS)
    builtin = max(fb.scalar(code, OPCODE_DEPRECATED_BUILTIN, "<b"), fb.scalar(code, OPCODE_BUILTIN, "<i"))
    if builtin != FULLY_CONNECTED or bias_index < 0:  # no bias (a converter drops an all-zero one): convert
        return None
    buffers = fb.tables(fb.root, MODEL_BUFFERS)
    weight_tensor, bias_tensor, output_tensor = tensors[weight_index], tensors[bias_index], tensors[output]
    head_buffers = {fb.scalar(t, TENSOR_BUFFER, "<I") for t in (weight_tensor, bias_tensor)}
    old_shape = fb.ints(weight_tensor, TENSOR_SHAPE)
    fits = (fb.scalar(weight_tensor, TENSOR_TYPE, "<b") == fb.scalar(bias_tensor, TENSOR_TYPE, "<b") == FLOAT32
            and len(old_shape) == 2 and old_shape[1] == weight.shape[1] and weight.shape[0] == len(bias)
            and fb.ints(output_tensor, TENSOR_SHAPE) == [1, old_shape[0]]
            and sum(fb.scalar(t, TENSOR_BUFFER, "<I") in head_buffers for t in tensors) == 2  # not shared
            and all(fb.field(buffers[b], BUFFER_DATA) is not None  # the data inside the flatbuffer
                    and fb.scalar(buffers[b], BUFFER_OFFSET, "<Q") == 0 for b in head_buffers))
    if not fits:
        return None

    out = bytearray(flatbuffer)

    def append_and_point(field: int, count: int, payload: bytes) -> None:
        out.extend(bytes((12 - len(out)) % 16))  # the vector's data (after its length) 16-byte aligned
        struct.pack_into("<I", out, field, len(out) - field)
        out.extend(struct.pack("<I", count) + payload)

    for tensor, values in ((weight_tensor, weight), (bias_tensor, bias)):
        data = float32_bytes(values)
        buffer = buffers[fb.scalar(tensor, TENSOR_BUFFER, "<I")]
        append_and_point(fb.field(buffer, BUFFER_DATA), len(data), data)
    shapes = ((weight_tensor, weight.shape), (bias_tensor, bias.shape), (output_tensor, (1, len(bias))))
    for tensor, shape in shapes:
        for index in (TENSOR_SHAPE, TENSOR_SHAPE_SIGNATURE):
            field = fb.field(tensor, index)
            if field is not None:
                append_and_point(field, len(shape), struct.pack(f"<{len(shape)}i", *shape))
    return bytes(out)
