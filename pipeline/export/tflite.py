"""LiteRT driver: litert-torch -> fp32 ``.tflite``; ai-edge-quantizer full-integer INT8 ``.tflite``.

- fp32 takes the contract's uint8 NHWC input (a CAST to float is the graph's first op).
- INT8 is converted from the same model taking float pixels (0..255), its biases corrected for
  the int8 rounding of its weights (``bias_correction.py``; held-out KL divergence from the float
  model 0.0092 / 0.0084 / 0.0061 / 0.0011 -> 0.0063 / 0.0063 / 0.0036 / 0.0007 on three
  MobileNetV3-Small runs and an EfficientNet-Lite0 one), then quantized with the
  ``static_wi8_ai8`` recipe, calibrated on real photos, with the activation ranges of ``ranges.py``
  (the quantizer's own moving-average update is replaced; a HARD_SWISH's input clipped to where
  it is not constant). The input range is pinned to the
  contract's [0, 255], so the input is int8 with scale 1 and zero point -128: a device feeds
  ``pixel - 128`` and no float op is left in the graph.

A head change (``trashsort add-class`` and friends) leaves every op but the last as it was, so
``with_new_head`` writes the new classifier into the source bundle's ``.tflite`` instead of
converting again: into the fp32 file as it is (``edge/head.py``, which a device repeats), into the
INT8 one quantized as this driver quantizes it (the same bias correction, weight grid and output
range rule, over the calibration photos' embeddings). Converting and calibrating the INT8 file
again was most of a head change's time.

Tensor names are cut to their last path component (plus the tensor index, to stay unique):
litert-torch writes each tensor's full module path (about 90 KB of strings in MobileNetV3-Small),
which is debug text, not model.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from edge import head as edge_head
from edge.runtimes import TFLiteRunner as Runner  # noqa: F401  (the driver interface)
from pipeline.export import check_precision
from pipeline.export.bias_correction import bias_corrected, corrected_head_bias
from pipeline.export.ranges import HARDSWISH_INPUT, INPUT_RANGE, clip_to, logits_range, percentile_range


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    check_precision(precision)
    if precision == "fp32":
        flatbuffer = _convert(model, torch.from_numpy(np.array(calibration[:1])))
    else:
        corrected = bias_corrected(model, calibration)
        float_model = _convert(corrected, torch.from_numpy(calibration[:1].astype(np.float32)))
        flatbuffer = _requantize_dead_channels(float_model, _quantize_int8(float_model, calibration))
    return _short_tensor_names(flatbuffer)


def with_new_head(payload: bytes, weight: np.ndarray, bias: np.ndarray,
                  calibration_features: np.ndarray | None = None, choice: None = None) -> bytes | None:
    """A head change's artefact: ``payload`` (a ``.tflite`` this driver wrote) with the classifier
    ``weight`` [classes, features] and ``bias`` written into its last op, for any class count; None
    if the graph does not end in a fully-connected classifier that fits (the export converts then).

    fp32 without ``calibration_features``; INT8 with them (the calibration photos' embeddings, the
    classifier's input: its bias correction and output range are measured on them). ``choice``:
    none (this driver's export chooses nothing)."""
    if calibration_features is None:
        return edge_head.with_new_head(payload, weight, bias)
    return _with_new_int8_head(payload, weight, bias, calibration_features)


def _with_new_int8_head(payload: bytes, weight: np.ndarray, bias: np.ndarray,
                        features: np.ndarray) -> bytes | None:
    """The INT8 file's classifier replaced as ``export`` would quantize it: bias corrected for the
    weights' rounding (``bias_correction.py``), weights per-channel symmetric int8, bias int32 at input
    scale x weight scale, the logits' range by ``ranges.py``'s rule over the calibration photos. The
    classifier's input (the backbone's output) keeps its quantization: the backbone is unchanged.
    Written as a device writes a head update (``edge/head.py``), so a device can rebuild it."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uq

    input_quantization = edge_head.classifier_input_quantization(payload)
    # an all-zero row has no int8 weight scale (ai-edge-quantizer's epsilon would overflow its bias)
    if input_quantization is None or features.shape[1] != weight.shape[1] or not weight.any(axis=1).all():
        return None
    corrected = corrected_head_bias(weight, bias, features)
    zero_point, scale = uq.tensor_zp_scale_from_min_max(
        weight.min(1, keepdims=True), weight.max(1, keepdims=True), 8, True, qtyping.QuantGranularity.CHANNELWISE)
    weight_params = qtyping.UniformQuantParams(8, 0, scale, zero_point, symmetric=True)
    input_params = qtyping.UniformQuantParams(8, None, np.array([input_quantization[0]], np.float32),
                                              np.array([input_quantization[1]]), symmetric=False)
    bias_params = uq.symmetric_quantize_bias_tensor(corrected, input_params, weight_params)
    low, high = logits_range(features, weight, corrected)
    out_zero_point, out_scale = uq.tensor_zp_scale_from_min_max(
        low, high, 8, False, qtyping.QuantGranularity.TENSORWISE)
    quantization = edge_head.Quantization(scale.ravel().astype(np.float32), bias_params.scale.astype(np.float32),
                                          float(out_scale), int(out_zero_point))
    weight_q = uq.uniform_quantize(weight, weight_params).astype(np.int8)
    return edge_head.with_new_head(payload, weight_q, bias_params.quantized_data.astype(np.int32), quantization)


def _convert(model: nn.Module, example: torch.Tensor) -> bytes:
    import litert_torch

    return bytes(litert_torch.convert(model.eval(), (example,)).model_content())


def _quantize_int8(float_model: bytes, calibration: np.ndarray) -> bytes:
    from ai_edge_quantizer import calibrator, quantizer, recipe

    qt = quantizer.Quantizer(float_model)
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    calib = calibrator.Calibrator(float_model, num_threads=os.cpu_count() or 1,
                                  qsv_update_func=_keep_per_photo_ranges)
    interpreter = _interpreter(float_model)
    signature, spec = next(iter(interpreter.get_signature_list().items()))
    input_arg = spec["inputs"][0]
    samples = [{input_arg: img[None].astype(np.float32)} for img in calibration]
    calib.calibrate({signature: samples}, qt._recipe_manager)  # public calibrate() fixes the update rule
    qsvs = {name: _percentile_range(qsv) for name, qsv in calib.get_model_qsvs().items()}
    for name in _hardswish_inputs(float_model) & qsvs.keys():
        low, high = clip_to(qsvs[name]["min"], qsvs[name]["max"], HARDSWISH_INPUT)
        qsvs[name] = {"min": low, "max": high}
    input_tensor = interpreter.get_input_details()[0]["name"]
    shape = qsvs[input_tensor]["min"].shape
    qsvs[input_tensor] = {"min": np.full(shape, INPUT_RANGE[0], np.float32),
                          "max": np.full(shape, INPUT_RANGE[1], np.float32)}
    return bytes(qt.quantize(qsvs).quantized_model)


def _keep_per_photo_ranges(qsv: dict, new: dict) -> dict:
    """Calibration update that keeps every photo's min and max (one photo per step)."""
    return {"min": np.minimum(qsv["min"], new["min"]), "max": np.maximum(qsv["max"], new["max"]),
            "mins": qsv.get("mins", [qsv["min"]]) + [new["min"]],
            "maxs": qsv.get("maxs", [qsv["max"]]) + [new["max"]]}


def _percentile_range(qsv: dict) -> dict:
    if "maxs" not in qsv:  # seen by one photo only
        return {"min": qsv["min"], "max": qsv["max"]}
    low, high = percentile_range(qsv["mins"], qsv["maxs"])
    return {"min": low, "max": high}


def _hardswish_inputs(float_model: bytes) -> set[str]:
    """Names of the tensors that only HARD_SWISH ops read."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    graph = model.subgraphs[0]
    hardswish_reads, other_reads = set(), set()
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        is_hardswish = schema.BuiltinOperator.HARD_SWISH in (code.builtinCode, code.deprecatedBuiltinCode)
        (hardswish_reads if is_hardswish else other_reads).update(int(i) for i in op.inputs)
    names = [graph.tensors[i].name for i in hardswish_reads - other_reads - set(graph.outputs)]
    return {n.decode() if isinstance(n, bytes) else n for n in names}


def _requantize_dead_channels(float_model: bytes, quantized: bytes) -> bytes:
    """Fix the int32 bias of output channels whose weights are all zero (dead after training).

    ai-edge-quantizer gives such a channel an epsilon weight scale (1e-9 / 127); its bias scale,
    input scale x weight scale, is then so small that the bias overflows int32 and the channel
    outputs garbage (a five-class MobileNetV3-Small with 45 dead channels: INT8 val top-1 26 %).
    Any scale represents zero weights exactly, so a dead channel takes its layer's largest weight
    scale and its bias is quantized again from the float model (same tensor indices)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    float_tflite = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(quantized))
    graph = model.subgraphs[0]
    for op in graph.operators:
        if len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        x, w, b = (graph.tensors[i] for i in op.inputs[:3])
        if b.type != schema.TensorType.INT32 or w.quantization is None or len(w.quantization.scale) < 2:
            continue
        weights = np.frombuffer(model.buffers[w.buffer].data, np.int8).reshape(w.shape)
        per_channel = np.moveaxis(weights, w.quantization.quantizedDimension, 0)
        dead = ~per_channel.reshape(len(w.quantization.scale), -1).any(axis=1)
        if not dead.any():
            continue
        weight_scale = np.array(w.quantization.scale, np.float32)
        weight_scale[dead] = weight_scale.max()
        bias_scale = np.float32(x.quantization.scale[0]) * weight_scale
        float_bias_tensor = float_tflite.subgraphs[0].tensors[op.inputs[2]]
        float_bias = np.frombuffer(float_tflite.buffers[float_bias_tensor.buffer].data, np.float32)
        bias = np.frombuffer(model.buffers[b.buffer].data, np.int32).copy()
        bias[dead] = np.clip(np.round(float_bias[dead] / bias_scale[dead]), -2**31, 2**31 - 1)
        w.quantization.scale = weight_scale.tolist()
        b.quantization.scale = bias_scale.tolist()
        model.buffers[b.buffer].data = bias.view(np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _short_tensor_names(flatbuffer: bytes) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    for subgraph in model.subgraphs:
        for i, tensor in enumerate(subgraph.tensors):
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
            if "/" in name:  # kept unique (tools such as the quantizer rely on it)
                tensor.name = f"{name.rsplit('/', 1)[-1]}#{i}"
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _interpreter(model: bytes, threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=model, num_threads=threads)


def tensor_types(model: bytes) -> set[str]:
    """The dtypes of every tensor in a ``.tflite`` (full-integer: no float32 among them)."""
    interpreter = _interpreter(model)
    return {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
