"""ONNX driver (the Jetson path): fp32 ONNX, and INT8 QDQ through onnxruntime static quantization
calibrated on real photos. On a Jetson, onnxruntime's TensorRT or CUDA provider runs either.

INT8 activation ranges follow ``ranges.py`` (as the LiteRT driver's do), given to onnxruntime as
tensor overrides; onnxruntime's pre-processing writes hardswish as ``x * HardSigmoid(x)``, so a
tensor read only that way (or only by a HardSigmoid) is clipped to where the activation is not
constant. Weights are per-channel int8, or 7-bit where that runs closer to the float model:
onnxruntime's x86 kernels without VNNI (AVX2 only, as on the machine this was measured on)
multiply uint8 by int8 with VPMADDUBSW, whose 16-bit pair sums saturate, and its docs advise
``reduce_range`` (7-bit weights) there. On the fine-tuned EfficientNet-Lite0 the 8-bit model ran
2.6 pp below PyTorch on val in the fused integer kernels while the same graph run unfused was within
0.8 pp; 7-bit weights: 0.5 pp. On MobileNetV3-Small 7-bit weights cost more than saturation does.
So both are quantized, and the one whose logits in this machine's onnxruntime are closer to the
float model's on the calibration photos (mean KL divergence) is kept. Each is quantized from the
model bias-corrected for its weight grid (``bias_correction.py``): held-out KL divergence of the
kept candidate from the float model 0.0095 / 0.0086 / 0.0068 / 0.0011 -> 0.0090 / 0.0069 / 0.0055 /
0.0007 on three MobileNetV3-Small runs and an EfficientNet-Lite0 one.

A head change writes its new classifier into the source bundle's INT8 model (``with_new_head``),
quantized as ``quantize_static`` quantized the old one, instead of quantizing twice again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edge.runtimes import OnnxRunner as Runner
from edge.runtimes import softmax
from pipeline.evaluate import predict_probs
from pipeline.export import check_precision, mean_kl
from pipeline.export.bias_correction import bias_corrected, corrected_head_bias
from pipeline.export.ranges import INPUT_RANGE, clip_to, logits_range, percentile_range

INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 17
# weight bits -> onnxruntime's symmetric per-channel int8 grid, max |w| / levels (7-bit: reduce_range)
WEIGHT_GRIDS = {8: 127, 7: 64}


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    check_precision(precision)
    with tempfile.TemporaryDirectory() as tmp:
        if precision == "fp32":
            return _to_onnx(model, calibration, Path(tmp) / "model.onnx").read_bytes()
        return _quantize_int8(model, calibration, Path(tmp)).read_bytes()


def _to_onnx(model: nn.Module, calibration: np.ndarray, path: Path) -> Path:
    example = torch.from_numpy(np.array(calibration[:1]))
    torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False)
    return path


def _quantize_int8(model: nn.Module, calibration: np.ndarray, tmp: Path) -> Path:
    """QDQ INT8 of ``model`` (see the module docstring), each weight-bit candidate from the model
    bias-corrected for its weight grid; returns the chosen model's path."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_probs = predict_probs(model, calibration)
    candidates = {}
    for weight_bits, levels in WEIGHT_GRIDS.items():
        corrected = bias_corrected(model, calibration, levels)
        prepared = tmp / f"prepared_w{weight_bits}.onnx"
        quant_pre_process(str(_to_onnx(corrected, calibration, tmp / f"float_w{weight_bits}.onnx")), str(prepared))
        overrides = _activation_ranges(prepared, calibration, tmp)
        out = tmp / f"int8_w{weight_bits}.onnx"
        quantize_static(str(prepared), str(out), _Photos(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=weight_bits == 7, extra_options={"TensorQuantOverrides": overrides})
        candidates[out] = mean_kl(float_probs, softmax(Runner(out)(calibration)))
    return min(candidates, key=candidates.__getitem__)


def describe(payload: bytes) -> dict[str, Any]:
    """What the manifest cannot learn from the runtime: an INT8 model's weight bits (8, or 7 where
    that was kept; see the module docstring). Weights are the int8 initializers a DequantizeLinear
    reads (activations are not initializers, biases are int32); 7-bit ones span at most -64..64."""
    bits = _weight_bits(onnx.load_from_string(payload).graph)
    return {} if bits is None else {"weight_bits": bits}


def _weight_bits(graph: onnx.GraphProto) -> int | None:
    """8 or 7 (see ``describe``); None for a model without int8 weights (fp32)."""
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    weights = [numpy_helper.to_array(t) for t in graph.initializer
               if t.name in dequantized and t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    if not weights:
        return None
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    return 8 if largest > 64 else 7


def with_new_head(payload: bytes, weight: np.ndarray, bias: np.ndarray,
                  calibration_features: np.ndarray | None = None, choice: None = None) -> bytes | None:
    """A head change's INT8 model: ``payload`` (an INT8 model this driver wrote) with the classifier
    ``weight`` [classes, features] and ``bias`` written into its last Gemm, quantized as
    ``quantize_static`` does (weights per channel on the file's weight grid, bias int32 at input
    scale x weight scale), its bias corrected for the weights' rounding and the logits' range taken by
    ``ranges.py``'s rule, both over ``calibration_features`` (the calibration photos' embeddings).
    None for an fp32 model (converting it takes under a second) or a graph that does not end so.
    ``choice``: none (this driver's export chooses its weight bits, and the file records them)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType, quantize_data

    if calibration_features is None:
        return None
    model = onnx.load_from_string(payload)
    graph = model.graph
    bits = _weight_bits(graph)
    if bits is None:
        return None
    producer = {name: node for node in graph.node for name in node.output}
    initializers = {t.name: t for t in graph.initializer}
    if len(graph.output) != 1:
        return None
    dequantize = producer.get(graph.output[0].name)  # logits <- DequantizeLinear <- QuantizeLinear <- Gemm
    quantize = dequantize and producer.get(dequantize.input[0])
    gemm = quantize and producer.get(quantize.input[0])
    if [n and n.op_type for n in (dequantize, quantize, gemm)] != ["DequantizeLinear", "QuantizeLinear", "Gemm"]:
        return None
    inputs = [producer.get(name) for name in gemm.input[:3]]
    if any(node is None or node.op_type != "DequantizeLinear" for node in inputs):
        return None
    x_scale, w_name, w_scale, w_zero, b_name, b_scale, b_zero = (
        inputs[0].input[1], *inputs[1].input, *inputs[2].input)
    attributes = {a.name: a for a in gemm.attribute}
    readers = [name for node in graph.node for name in node.input if name in (w_name, b_name)]
    head = (w_name, w_scale, w_zero, b_name, b_scale, b_zero, x_scale, *quantize.input[1:])
    features = weight.shape[1]
    if (len(gemm.input) != 3 or not all(name in initializers for name in head) or len(readers) != 2
            or "transB" not in attributes or attributes["transB"].i != 1
            or list(initializers[w_name].dims)[1:] != [features] or calibration_features.shape[1] != features):
        return None

    corrected = corrected_head_bias(weight, bias, calibration_features, WEIGHT_GRIDS[bits])
    rows = [quantize_data(row, onnx.TensorProto.INT8, symmetric=True, reduce_range=bits == 7) for row in weight]
    w_q = np.stack([q for _, _, q in rows]).astype(np.int8)
    scales = np.array([s for _, s, _ in rows], np.float32).reshape(-1)
    # the bias as onnxruntime's quantizer quantizes it (its quantize_bias_static_impl is a method, not public)
    bias_scale = (numpy_helper.to_array(initializers[x_scale]) * scales).astype(np.float32)
    b_q = np.clip(np.round(corrected.astype(np.float64) / bias_scale), -2**31, 2**31 - 1).astype(np.int32)
    low, high = logits_range(calibration_features, weight, corrected)
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8)
    out_zero, out_scale = compute_scale_zp(low, high, qmin, qmax)
    classes = len(bias)
    values = {w_name: w_q, w_scale: scales, w_zero: np.zeros(classes, np.int8),
              b_name: b_q, b_scale: bias_scale, b_zero: np.zeros(classes, np.int32),
              quantize.input[1]: np.asarray(out_scale, np.float32),
              quantize.input[2]: np.asarray(out_zero, np.int8)}
    for name, array in values.items():
        initializers[name].CopyFrom(numpy_helper.from_array(array, name))
    graph.output[0].type.tensor_type.shape.dim[-1].dim_value = classes
    stale = {*gemm.output, *quantize.output, graph.output[0].name}  # shapes inferred for the old class count
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model.SerializeToString()


class _Photos:
    """onnxruntime's calibration reader over uint8 NHWC photos, one at a time."""

    def __init__(self, photos: np.ndarray) -> None:
        self.photos = iter(photos)

    def get_next(self) -> dict[str, np.ndarray] | None:
        photo = next(self.photos, None)
        return None if photo is None else {INPUT_NAME: np.array(photo[None])}


def _activation_ranges(prepared: Path, calibration: np.ndarray, tmp: Path) -> dict[str, list[dict]]:
    """``TensorQuantOverrides`` giving every activation its ``ranges.py`` range."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(str(prepared), augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    per_photo = []
    for photo in calibration:
        calibrator.collect_data(_Photos(photo[None]))
        per_photo.append(calibrator.calibrate_tensors_range)
        calibrator.calibrate_tensors_range = None  # the next photo's extremes on their own
    overrides = {}
    for name in per_photo[0].keys():
        low, high = percentile_range([p[name].range_value[0] for p in per_photo],
                                     [p[name].range_value[1] for p in per_photo])
        overrides[name] = [{"rmin": low, "rmax": high}]
    graph = onnx.load(str(prepared)).graph
    for name, interval in _saturated_inputs(graph).items():
        if name in overrides:
            low, high = clip_to(overrides[name][0]["rmin"], overrides[name][0]["rmax"], interval)
            overrides[name] = [{"rmin": low, "rmax": high}]
    for pixels in _pixel_tensors(graph):
        overrides[pixels] = [{"rmin": np.float32(INPUT_RANGE[0]), "rmax": np.float32(INPUT_RANGE[1])}]
    return overrides


def _pixel_tensors(graph: onnx.GraphProto) -> list[str]:
    """The input's pixels as float: the Cast's output and the Transpose to NCHW after it (the first
    tensor quantized), which only move the 0..255 values."""
    names, current = [], INPUT_NAME
    while (readers := [n for n in graph.node if current in n.input]) and len(readers) == 1 \
            and readers[0].op_type in ("Cast", "Transpose"):
        current = readers[0].output[0]
        names.append(current)
    return names


def _saturated_inputs(graph: onnx.GraphProto) -> dict[str, tuple[float, float]]:
    """Tensors read only by one HardSigmoid ``h`` (and by Muls computing ``x * h(x)``, hardswish),
    with the interval of ``x`` where ``h`` is not constant (0 below ``-beta/alpha``, 1 above)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    intervals = {}
    outputs = {o.name for o in graph.output}
    for name, nodes in readers.items():
        if name in outputs:
            continue
        sigmoids = [n for n in nodes if n.op_type == "HardSigmoid"]
        if len(sigmoids) != 1:
            continue
        gate = sigmoids[0]
        others = [n for n in nodes if n is not gate]
        if not all(n.op_type == "Mul" and set(n.input) == {name, gate.output[0]} for n in others):
            continue
        attrs = {a.name: a.f for a in gate.attribute}
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)  # ONNX's defaults
        low, high = -beta / alpha, (1 - beta) / alpha
        intervals[name] = (low, float("inf")) if others else (low, high)
    return intervals

