"""The classifier inside a ``.pte``'s XNNPACK delegate, found and replaced without lowering again.

A head change leaves every op but the last as it was, and ExecuTorch's lowering is most of what a
``.pte`` costs to export (about 15 s fp32, 30 s INT8 for MobileNetV3-Small here). The XNNPACK
delegate keeps its graph as a flatbuffer (``executorch/backends/xnnpack/serialization/schema.fbs``)
and its weights in the program's named data, each under its sha256. So a new head is written where
the old one was: new named data for the weight and bias (and, INT8, their scales), the keys and
sizes that point at them, the shapes, and the logits' quantization. Every field written keeps its
size (a shape ``[classes, features]`` stays two numbers, a sha256 key 64 characters), so the graph's
flatbuffer is patched in place and the rest of the file is ExecuTorch's own serializer
(``deserialize_pte_binary`` / ``serialize_pte_binary``, byte-exact on an unchanged program).
The program's output tensor takes the new class count, moved to the end of its memory arena when
it grows (it may not overlap anything planned there).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from executorch.exir._serialize._program import PTEFile, deserialize_pte_binary, serialize_pte_binary
from executorch.exir.schema import DataLocation, DelegateCall

from edge.head import Flatbuffer

# The few fields of the XNNPACK graph schema read or written here (a union takes two slots).
GRAPH_XNODES, GRAPH_XVALUES, GRAPH_OUTPUT_IDS, GRAPH_CONSTANT_DATA = 1, 2, 5, 8
UNION_TYPE, UNION_VALUE = 0, 1  # in XNode and XValue
FULLY_CONNECTED_INPUTS, FULLY_CONNECTED_OUTPUT = (0, 1, 2), 3  # input1_id, filter_id, bias_id; output_id
CONVERT_INPUT, CONVERT_OUTPUT = 0, 1
TENSOR_DIMS, TENSOR_CONSTANT_BUFFER = 2, 3
QUANTIZED_TENSOR, QUANTIZED_PARAMS_TYPE, QUANTIZED_PARAMS = 0, 1, 2
PER_TENSOR_SCALE, PER_TENSOR_ZERO_POINT = 0, 1
PER_CHANNEL_SCALE_BUFFER, PER_CHANNEL_NUM_SCALES = 2, 3
CONSTANT_SIZE, CONSTANT_KEY = 1, 2
NODE_FULLY_CONNECTED, NODE_CONVERT = 2, 18
VALUE_QUANTIZED = 2  # (1: a plain tensor)
PER_CHANNEL, PER_TENSOR = 1, 2
NO_VALUE = 0xFFFFFFFF
SCALE_KEY_PREFIX = "scale_"  # ExecuTorch's XNNPACK serializer names per-channel scales so
SEGMENT_ALIGNMENT = 128  # ExecutorchBackendConfig's default, as the export wrote the file
HEADER_MAGIC, HEADER_GRAPH_OFFSET, HEADER_GRAPH_SIZE = slice(4, 8), 10, 14  # XNNHeader: where the graph is


@dataclass(frozen=True)
class Classifier:
    """Where a ``.pte``'s classifier (the fully-connected op its output comes from) is kept: the
    delegate, table positions inside its graph's flatbuffer, and the program's output value."""

    delegate: int  # index into program.backend_delegate_data
    graph_offset: int  # where the graph's flatbuffer starts in that blob
    program_output: int
    precision: str
    shape: tuple[int, int]  # classes, features
    weight: int  # tensor tables (of a quantized value: its base tensor)
    bias: int
    outputs: tuple[int, ...]  # the op's output, and (INT8) the fp32 one converted from it
    weight_quantization: int | None = None  # PerChannelQuant tables (INT8)
    bias_quantization: int | None = None
    output_quantization: int | None = None  # PerTensorQuant table of the int8 logits
    input_quantization: tuple[float, int] | None = None  # the classifier input's scale and zero point


@dataclass(frozen=True)
class Head:
    """A classifier as the delegate stores it: weight and bias bytes, and for INT8 the per-class
    weight and bias scales (float32 bytes) and the logits' scale and zero point."""

    weight: bytes
    bias: bytes
    weight_scale: bytes = b""
    bias_scale: bytes = b""
    output_quantization: tuple[float, int] | None = None


def find_classifier(pte: PTEFile) -> Classifier | None:
    """The fully-connected classifier the program's one output comes from, inside an XNNPACK
    delegate, with its weight and bias in named data (fp32, or per-channel int8 with an int32 bias);
    None if the program is not of that form."""
    program = pte.program
    if len(program.execution_plan) != 1 or len(program.execution_plan[0].outputs) != 1:
        return None
    plan = program.execution_plan[0]
    output = plan.outputs[0]
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions
             if isinstance(i.instr_args, DelegateCall) and output in i.instr_args.args]
    if len(calls) != 1:
        return None
    reference = plan.delegates[calls[0].delegate_index].processed
    if reference.location != DataLocation.INLINE:
        return None
    blob = program.backend_delegate_data[reference.index].data
    if blob[HEADER_MAGIC] != b"XH00":
        return None
    graph_offset, graph_size = struct.unpack_from("<II", blob, HEADER_GRAPH_OFFSET)
    found = _graph_classifier(Flatbuffer(bytes(blob[graph_offset:graph_offset + graph_size])))
    return None if found is None else Classifier(reference.index, graph_offset, output, **found)


def _graph_classifier(fb: Flatbuffer) -> dict[str, Any] | None:
    """``Classifier``'s fields inside the graph: the fully-connected op its one output comes from
    (through a Convert, INT8)."""
    root = fb.root
    outputs = fb.ints(root, GRAPH_OUTPUT_IDS)
    if len(outputs) != 1:
        return None
    nodes = [(fb.scalar(n, UNION_TYPE, "<B"), fb.table(n, UNION_VALUE)) for n in fb.tables(root, GRAPH_XNODES)]
    values = fb.tables(root, GRAPH_XVALUES)
    producer = {fb.scalar(node, _output_field(kind), "<I"): (kind, node) for kind, node in nodes
                if kind in (NODE_FULLY_CONNECTED, NODE_CONVERT)}
    kind, node = producer.get(outputs[0], (None, None))
    value_ids = [outputs[0]]
    if kind == NODE_CONVERT:  # INT8: the int8 logits converted to the fp32 output
        value_ids.insert(0, fb.scalar(node, CONVERT_INPUT, "<I"))
        kind, node = producer.get(value_ids[0], (None, None))
    if kind != NODE_FULLY_CONNECTED:
        return None
    input_id, weight_id, bias_id = (fb.scalar(node, f, "<I") for f in FULLY_CONNECTED_INPUTS)
    if bias_id == NO_VALUE or max(input_id, weight_id, bias_id, *value_ids) >= len(values):
        return None  # no bias (an all-zero one may be dropped): nothing to write into
    weight, bias, *outs = (_tensor_value(fb, values[i]) for i in (weight_id, bias_id, *value_ids))
    shape = fb.ints(weight[0], TENSOR_DIMS)
    constants = fb.tables(root, GRAPH_CONSTANT_DATA)
    if (len(shape) != 2 or fb.ints(bias[0], TENSOR_DIMS) != shape[:1]
            or any(fb.ints(out, TENSOR_DIMS) != [1, shape[0]] for out, _ in outs)
            or not all(_constant(fb, constants, tensor) for tensor, _ in (weight, bias))):
        return None
    found = {"shape": (shape[0], shape[1]), "weight": weight[0], "bias": bias[0],
             "outputs": tuple(out for out, _ in outs)}
    if weight[1] is None and bias[1] is None and len(outs) == 1:
        return {"precision": "fp32", **found}
    params = [_quantization(fb, value, kind) for value, kind in
              ((weight, PER_CHANNEL), (bias, PER_CHANNEL), (outs[0], PER_TENSOR),
               (_tensor_value(fb, values[input_id]), PER_TENSOR))]
    if None in params or len(outs) != 2:
        return None
    if (any(fb.field(p, f) is None for p in params[2:] for f in (PER_TENSOR_SCALE, PER_TENSOR_ZERO_POINT))
            or not all(_constant(fb, constants, p, scale=True) for p in params[:2])):
        return None  # (a zero point of 0 may be left out of the flatbuffer: no field to write into)
    output_params, input_params = params[2:]
    return {"precision": "int8", **found, "weight_quantization": params[0], "bias_quantization": params[1],
            "output_quantization": output_params, "input_quantization": _per_tensor(fb, input_params)}


def _per_tensor(fb: Flatbuffer, params: int) -> tuple[float, int]:
    return fb.scalar(params, PER_TENSOR_SCALE, "<f"), fb.scalar(params, PER_TENSOR_ZERO_POINT, "<i")


def _output_field(kind: int) -> int:
    return FULLY_CONNECTED_OUTPUT if kind == NODE_FULLY_CONNECTED else CONVERT_OUTPUT


def _tensor_value(fb: Flatbuffer, value: int) -> tuple[int, int | None]:
    """An XValue's tensor table, and its quantized wrapper (None for a plain tensor)."""
    table = fb.table(value, UNION_VALUE)
    if fb.scalar(value, UNION_TYPE, "<B") == VALUE_QUANTIZED:
        return fb.table(table, QUANTIZED_TENSOR), table
    return table, None


def _quantization(fb: Flatbuffer, value: tuple[int, int | None], kind: int) -> int | None:
    _, quantized = value
    if quantized is None or fb.scalar(quantized, QUANTIZED_PARAMS_TYPE, "<B") != kind:
        return None
    return fb.table(quantized, QUANTIZED_PARAMS)


def _constant(fb: Flatbuffer, constants: list[int], table: int, scale: bool = False) -> int | None:
    """The named-data entry (ConstantDataOffset) a tensor's data or a per-channel scale is kept in,
    if its size and key are there to be written in place."""
    index = fb.scalar(table, PER_CHANNEL_SCALE_BUFFER if scale else TENSOR_CONSTANT_BUFFER, "<I")
    if not 0 < index < len(constants):
        return None
    entry = constants[index]
    key = fb.table(entry, CONSTANT_KEY)
    key_length = 64 + (len(SCALE_KEY_PREFIX) if scale else 0)  # a sha256, as the new key will be
    if fb.field(entry, CONSTANT_SIZE) is None or key is None or fb.u32(key) != key_length:
        return None
    shared = sum(fb.table(other, CONSTANT_KEY) == key for other in constants) > 1  # one string, two entries
    return None if shared else entry


def read_head(payload: bytes) -> Head | None:
    """The classifier of a ``.pte`` as stored (None if it has none that ``find_classifier`` finds)."""
    pte = deserialize_pte_binary(payload)
    classifier = find_classifier(pte)
    if classifier is None:
        return None
    fb = _graph(pte, classifier)
    constants = fb.tables(fb.root, GRAPH_CONSTANT_DATA)

    def data(table: int, scale: bool = False) -> bytes:
        key = _key(fb, _constant(fb, constants, table, scale))
        return pte.named_data.buffers[pte.named_data.pte_data[key].buffer_index]

    if classifier.precision == "fp32":
        return Head(data(classifier.weight), data(classifier.bias))
    return Head(data(classifier.weight), data(classifier.bias), data(classifier.weight_quantization, True),
                data(classifier.bias_quantization, True), _per_tensor(fb, classifier.output_quantization))


def _graph(pte: PTEFile, classifier: Classifier) -> Flatbuffer:
    blob = pte.program.backend_delegate_data[classifier.delegate].data
    size = struct.unpack_from("<I", blob, HEADER_GRAPH_SIZE)[0]
    return Flatbuffer(bytes(blob[classifier.graph_offset:classifier.graph_offset + size]))


def _key(fb: Flatbuffer, entry: int) -> str:
    key = fb.table(entry, CONSTANT_KEY)
    return fb.data[key + 4:key + 4 + fb.u32(key)].decode()


def with_new_head(pte: PTEFile, classifier: Classifier, head: Head, classes: int) -> bytes:
    """The program with ``head`` (``classes`` rows) written where ``classifier`` keeps its own."""
    fb = _graph(pte, classifier)
    graph = bytearray(fb.data)
    constants = fb.tables(fb.root, GRAPH_CONSTANT_DATA)
    named = pte.named_data
    old_keys = []

    def put(table: int, data: bytes, scale: bool = False) -> None:
        entry = _constant(fb, constants, table, scale)
        old_keys.append(_key(fb, entry))
        key = (SCALE_KEY_PREFIX if scale else "") + hashlib.sha256(data).hexdigest()
        struct.pack_into("<Q", graph, fb.field(entry, CONSTANT_SIZE), len(data))
        key_at = fb.table(entry, CONSTANT_KEY) + 4
        graph[key_at:key_at + len(key)] = key.encode()
        if key not in named.pte_data:  # laid out as the export's other entries
            named.buffers.append(data)
            template = next(iter(named.pte_data.values()))
            named.pte_data[key] = replace(template, buffer_index=len(named.buffers) - 1)

    def set_dim(tensor: int, position: int) -> None:
        struct.pack_into("<I", graph, fb.table(tensor, TENSOR_DIMS) + 4 + 4 * position, classes)

    put(classifier.weight, head.weight)
    put(classifier.bias, head.bias)
    set_dim(classifier.weight, 0)
    set_dim(classifier.bias, 0)
    for tensor in classifier.outputs:
        set_dim(tensor, 1)
    if classifier.precision == "int8":
        for table, scales in ((classifier.weight_quantization, head.weight_scale),
                              (classifier.bias_quantization, head.bias_scale)):
            put(table, scales, scale=True)
            struct.pack_into("<I", graph, fb.field(table, PER_CHANNEL_NUM_SCALES), classes)
        scale, zero_point = head.output_quantization
        struct.pack_into("<f", graph, fb.field(classifier.output_quantization, PER_TENSOR_SCALE), scale)
        struct.pack_into("<i", graph, fb.field(classifier.output_quantization, PER_TENSOR_ZERO_POINT), zero_point)

    program = pte.program
    blob = bytearray(program.backend_delegate_data[classifier.delegate].data)
    blob[classifier.graph_offset:classifier.graph_offset + len(graph)] = graph
    program.backend_delegate_data[classifier.delegate].data = bytes(blob)
    _drop_unused(pte, old_keys)
    _resize_output(program.execution_plan[0], classifier, classes)
    return bytes(serialize_pte_binary(pte, extract_delegate_segments=True, segment_alignment=SEGMENT_ALIGNMENT))


def _drop_unused(pte: PTEFile, keys: list[str]) -> None:
    """Named data of the old head that no delegate refers to any more (a key is in its graph's bytes)."""
    blobs = [d.data for d in pte.program.backend_delegate_data]
    named = pte.named_data
    unused = {k for k in keys if not any(k.encode() in blob for blob in blobs)}
    if not unused or named.external_data:  # (buffers of external data files: left as they are)
        return
    kept = [(k, e) for k, e in named.pte_data.items() if k not in unused]
    buffers = {e.buffer_index for _, e in kept}
    index = {old: new for new, old in enumerate(sorted(buffers))}
    named.buffers[:] = [named.buffers[i] for i in sorted(buffers)]
    named.pte_data.clear()
    named.pte_data.update({k: replace(e, buffer_index=index[e.buffer_index]) for k, e in kept})


def _resize_output(plan: object, classifier: Classifier, classes: int) -> None:
    """The program's output tensor as ``[1, classes]``; when it grows it takes new room at the end of
    its memory arena (planned memory around it may be in use when it is written)."""
    tensor = plan.values[classifier.program_output].val
    old = int(np.prod(tensor.sizes))
    tensor.sizes = [1, classes]
    info = tensor.allocation_info
    if info is None or classes <= old:
        return
    element = 4  # float32 logits
    arena = info.memory_id
    start = -(-plan.non_const_buffer_sizes[arena] // 16) * 16
    plan.non_const_buffer_sizes[arena] = start + element * classes
    info.memory_offset_low, info.memory_offset_high = start & 0xFFFFFFFF, start >> 32
