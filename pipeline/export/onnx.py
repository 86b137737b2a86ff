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
from pipeline.export.bias_correction import bias_corrected
from pipeline.export.ranges import INPUT_RANGE, clip_to, percentile_range

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
    graph = onnx.load_from_string(payload).graph
    dequantized = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    weights = [numpy_helper.to_array(t) for t in graph.initializer
               if t.name in dequantized and t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    if not weights:
        return {}
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    return {"weight_bits": 8 if largest > 64 else 7}


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

