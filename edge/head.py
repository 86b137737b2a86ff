"""A new classifier head for a ``.tflite`` already on the device: a head update instead of a model.

A head change (``trashsort add-class`` and friends) leaves every op but the last as it was. The
pipeline therefore writes the new head into the previous bundle's ``.tflite`` files
(``with_new_head``), and the new bundle records where each came from: its manifest entry's
``head_update`` holds the sha256 of the previous file and names the head file, the classifier as
stored in the new file (``head_fp32.bin``: weight then bias, little-endian float32; ``head_int8.bin``:
the int8 weight, int32 bias and their quantization, see ``head_bytes``; a few KB to a few tens of
KB). A device that has the previous bundle needs the new bundle without those ``.tflite`` files, and
rebuilds them here byte for byte (``apply_head_update``; ``edge/classify.py --head-update-from
OLD_BUNDLE``): a rebuilt file must hash to the new manifest's sha256, or nothing is written.

numpy only (no torch, no flatbuffers library), like the rest of ``edge/``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import BundleInvalid, read_manifest, sha256_file

HEAD_FILES = {"fp32": "head_fp32.bin", "int8": "head_int8.bin"}


@dataclass(frozen=True)
class Quantization:
    """An INT8 classifier's quantization: per-class weight and bias scales (symmetric, zero point 0)
    and the int8 logits' scale and zero point."""

    weight_scale: np.ndarray  # float32 [classes]
    bias_scale: np.ndarray  # float32 [classes]
    output_scale: float
    output_zero_point: int


def float32_bytes(values: np.ndarray) -> bytes:
    """Little-endian float32, as both the head file and a .tflite buffer store weights."""
    return np.ascontiguousarray(values, "<f4").tobytes()


def head_bytes(weight: np.ndarray, bias: np.ndarray, quantization: Quantization | None = None) -> bytes:
    """The head file's content, little-endian. fp32: weight (classes x features) then bias, float32.
    INT8: bias int32, weight scales, bias scales, logits scale (float32), logits zero point (int32),
    then the int8 weight."""
    if quantization is None:
        return float32_bytes(weight) + float32_bytes(bias)
    q = quantization
    scales = float32_bytes(np.concatenate([q.weight_scale, q.bias_scale, [q.output_scale]]))
    return (np.ascontiguousarray(bias, "<i4").tobytes() + scales + np.array([q.output_zero_point], "<i4").tobytes()
            + np.ascontiguousarray(weight, np.int8).tobytes())


def read_head(path: Path, shape: list[int], precision: str = "fp32",
              ) -> tuple[np.ndarray, np.ndarray, Quantization | None]:
    """A head file's weight, bias and (INT8) quantization; its size must fit the manifest's shape."""
    classes, features = shape
    data = path.read_bytes()
    needed = 4 * classes * (features + 1) if precision == "fp32" else 12 * classes + 8 + classes * features
    if len(data) != needed:
        raise BundleInvalid(f"{path}: {len(data)} bytes, a {precision} head of the manifest's shape {shape} "
                            f"takes {needed}")
    if precision == "fp32":
        values = np.frombuffer(data, dtype="<f4")
        return values[:classes * features].reshape(classes, features), values[classes * features:], None
    k = classes
    bias = np.frombuffer(data, "<i4", k)
    scales = np.frombuffer(data, "<f4", 2 * k + 1, 4 * k)
    zero_point = int(np.frombuffer(data, "<i4", 1, 12 * k + 4)[0])
    weight = np.frombuffer(data, np.int8, k * features, 12 * k + 8).reshape(k, features)
    return weight, bias, Quantization(scales[:k], scales[k:2 * k], float(scales[2 * k]), zero_point)


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
        rebuilt = with_new_head(source.read_bytes(), *read_head(head_path, update["shape"], entry["precision"]))
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
TENSOR_SHAPE, TENSOR_TYPE, TENSOR_BUFFER, TENSOR_QUANTIZATION, TENSOR_SHAPE_SIGNATURE = 0, 1, 2, 4, 7
QUANTIZATION_SCALE, QUANTIZATION_ZERO_POINT = 2, 3
OPERATOR_OPCODE_INDEX, OPERATOR_INPUTS, OPERATOR_OUTPUTS = 0, 1, 2
OPCODE_DEPRECATED_BUILTIN, OPCODE_BUILTIN = 0, 3
BUFFER_DATA, BUFFER_OFFSET = 0, 1
FULLY_CONNECTED = 9
FLOAT32, INT32, INT8 = 0, 2, 9


class Flatbuffer:
    """Read-only navigation of a flatbuffer: tables, their fields, vectors (little-endian)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.root = self.u32(0)

    def u32(self, pos: int) -> int:
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

    def table(self, table: int, index: int) -> int | None:
        """The sub-table, or vector (its length, then its items), that field ``index`` points to."""
        pos = self.field(table, index)
        return None if pos is None else pos + self.u32(pos)

    def tables(self, table: int, index: int) -> list[int]:
        vector = self.table(table, index)
        if vector is None:
            return []
        slots = (vector + 4 + 4 * k for k in range(self.u32(vector)))
        return [slot + self.u32(slot) for slot in slots]

    def ints(self, table: int, index: int) -> list[int]:
        vector = self.table(table, index)
        if vector is None:
            return []
        return list(struct.unpack_from(f"<{self.u32(vector)}i", self.data, vector + 4))

    def array(self, table: int, index: int, dtype: str) -> np.ndarray:
        vector = self.table(table, index)
        if vector is None:
            return np.zeros(0, dtype)
        return np.frombuffer(self.data, dtype, self.u32(vector), vector + 4)


@dataclass(frozen=True)
class _Classifier:
    """Where a ``.tflite``'s last op, a fully-connected classifier, keeps its tensors and buffers."""

    input: int  # tensor tables
    weight: int
    bias: int
    output: int
    weight_buffer: int  # buffer tables
    bias_buffer: int
    precision: str


def _find_classifier(fb: Flatbuffer) -> _Classifier | None:
    """The classifier the graph ends in (one subgraph, one output, a fully-connected op with its own
    weight and bias buffers inside the file), or None."""
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
    input_index, weight_index, bias_index = fb.ints(op, OPERATOR_INPUTS)
    builtin = max(fb.scalar(code, OPCODE_DEPRECATED_BUILTIN, "<b"), fb.scalar(code, OPCODE_BUILTIN, "<i"))
    if builtin != FULLY_CONNECTED or bias_index < 0:  # no bias (a converter drops an all-zero one): convert
        return None
    buffers = fb.tables(fb.root, MODEL_BUFFERS)
    weight, bias, out = tensors[weight_index], tensors[bias_index], tensors[output]
    head_buffers = {fb.scalar(t, TENSOR_BUFFER, "<I") for t in (weight, bias)}
    types = tuple(fb.scalar(t, TENSOR_TYPE, "<b") for t in (weight, bias, out))
    precision = {(FLOAT32, FLOAT32, FLOAT32): "fp32", (INT8, INT32, INT8): "int8"}.get(types)
    shape = fb.ints(weight, TENSOR_SHAPE)
    fits = (precision is not None and len(shape) == 2 and fb.ints(bias, TENSOR_SHAPE) == shape[:1]
            and fb.ints(out, TENSOR_SHAPE) == [1, shape[0]]
            and sum(fb.scalar(t, TENSOR_BUFFER, "<I") in head_buffers for t in tensors) == 2  # not shared
            and all(fb.field(buffers[b], BUFFER_DATA) is not None  # the data inside the flatbuffer
                    and fb.scalar(buffers[b], BUFFER_OFFSET, "<Q") == 0 for b in head_buffers)
            and (precision == "fp32" or all(_quantization_fields(fb, t) for t in (weight, bias, out))))
    if not fits:
        return None
    return _Classifier(tensors[input_index], weight, bias, out, buffers[fb.scalar(weight, TENSOR_BUFFER, "<I")],
                       buffers[fb.scalar(bias, TENSOR_BUFFER, "<I")], precision)


def _quantization_fields(fb: Flatbuffer, tensor: int) -> tuple[int, int] | None:
    """Where a tensor's quantization keeps its scale and zero-point vectors (None if it has none)."""
    params = fb.table(tensor, TENSOR_QUANTIZATION)
    if params is None:
        return None
    scale, zero_point = fb.field(params, QUANTIZATION_SCALE), fb.field(params, QUANTIZATION_ZERO_POINT)
    return None if scale is None or zero_point is None else (scale, zero_point)


def read_classifier(flatbuffer: bytes) -> tuple[np.ndarray, np.ndarray, Quantization | None] | None:
    """The weight, bias and (INT8) quantization of the classifier a ``.tflite`` ends in, as stored
    (what its head file holds); None if it does not end in one."""
    fb = Flatbuffer(flatbuffer)
    head = _find_classifier(fb)
    if head is None:
        return None
    classes, features = fb.ints(head.weight, TENSOR_SHAPE)
    dtypes = ("<f4", "<f4") if head.precision == "fp32" else (np.int8, "<i4")
    weight = fb.array(head.weight_buffer, BUFFER_DATA, np.uint8).view(dtypes[0]).reshape(classes, features)
    bias = fb.array(head.bias_buffer, BUFFER_DATA, np.uint8).view(dtypes[1])
    if head.precision == "fp32":
        return weight, bias, None

    (weight_scale, _), (bias_scale, _), (output_scale, output_zero_point) = (
        _quantization(fb, t) for t in (head.weight, head.bias, head.output))
    return weight, bias, Quantization(weight_scale, bias_scale, float(output_scale[0]), int(output_zero_point[0]))


def classifier_input_quantization(flatbuffer: bytes) -> tuple[float, int] | None:
    """Scale and zero point of an INT8 classifier's input (the backbone's output), which a new head's
    bias scale derives from; None if the file does not end in an INT8 classifier."""
    fb = Flatbuffer(flatbuffer)
    head = _find_classifier(fb)
    if head is None or head.precision != "int8" or fb.table(head.input, TENSOR_QUANTIZATION) is None:
        return None
    scale, zero_point = _quantization(fb, head.input)
    return (float(scale[0]), int(zero_point[0])) if len(scale) == 1 and len(zero_point) == 1 else None


def _quantization(fb: Flatbuffer, tensor: int) -> tuple[np.ndarray, np.ndarray]:
    params = fb.table(tensor, TENSOR_QUANTIZATION)
    return fb.array(params, QUANTIZATION_SCALE, "<f4"), fb.array(params, QUANTIZATION_ZERO_POINT, "<i8")


def with_new_head(flatbuffer: bytes, weight: np.ndarray, bias: np.ndarray,
                  quantization: Quantization | None = None) -> bytes | None:
    """The ``.tflite`` with the weight and bias of its last op, a fully-connected classifier,
    replaced (any number of classes); None if the graph does not end in one that fits. fp32: float
    weight and bias; INT8: int8 weight, int32 bias and their ``quantization`` (computed by the
    pipeline, ``pipeline/export/tflite.py``).

    A head change leaves the rest of the graph as it was, and the conversion this skips is most of
    a head change's time. Every byte of the previous file stays: the new weight, bias, shapes (and
    quantization vectors) are appended and the fields that pointed at the old ones are re-pointed (a
    flatbuffer offset may point anywhere after itself), so the old head stays behind as unused bytes
    (a few tens of KB; a full export starts afresh). That is simple enough to do the same way on any
    device (the Android core's ``HeadUpdate.kt`` does), byte for byte, with no flatbuffers library;
    the pipeline gates the result like any export, and a device checks its sha256."""
    fb = Flatbuffer(flatbuffer)
    head = _find_classifier(fb)
    classes = len(bias)
    if (head is None or head.precision != ("fp32" if quantization is None else "int8") or weight.ndim != 2
            or weight.shape != (classes, fb.ints(head.weight, TENSOR_SHAPE)[1])):
        return None

    out = bytearray(flatbuffer)

    def append_and_point(field: int, count: int, payload: bytes) -> None:
        out.extend(bytes((12 - len(out)) % 16))  # the vector's data (after its length) 16-byte aligned
        struct.pack_into("<I", out, field, len(out) - field)
        out.extend(struct.pack("<I", count) + payload)

    if quantization is None:
        data = float32_bytes(weight), float32_bytes(bias)
    else:
        data = np.ascontiguousarray(weight, np.int8).tobytes(), np.ascontiguousarray(bias, "<i4").tobytes()
    for buffer, values in zip((head.weight_buffer, head.bias_buffer), data):
        append_and_point(fb.field(buffer, BUFFER_DATA), len(values), values)
    shapes = ((head.weight, weight.shape), (head.bias, bias.shape), (head.output, (1, classes)))
    for tensor, shape in shapes:
        for index in (TENSOR_SHAPE, TENSOR_SHAPE_SIGNATURE):
            field = fb.field(tensor, index)
            if field is not None:
                append_and_point(field, len(shape), struct.pack(f"<{len(shape)}i", *shape))
    if quantization is not None:
        q = quantization
        vectors = ((head.weight, q.weight_scale, np.zeros(classes)), (head.bias, q.bias_scale, np.zeros(classes)),
                   (head.output, [q.output_scale], [q.output_zero_point]))
        for tensor, scale, zero_point in vectors:
            scale_field, zero_point_field = _quantization_fields(fb, tensor)
            append_and_point(scale_field, len(scale), float32_bytes(np.asarray(scale)))
            append_and_point(zero_point_field, len(zero_point), np.asarray(zero_point, "<i8").tobytes())
    return bytes(out)
