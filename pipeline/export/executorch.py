"""ExecuTorch driver: ``torch.export`` -> XNNPACK-lowered ``.pte`` (fp32, and INT8 through PT2E).

INT8 uses ``XNNPACKQuantizer`` (per-channel symmetric weights, per-tensor activations), calibrated
on real preprocessed training photos, never random tensors. Activations are ranged two ways, PT2E's
histogram observer and the LiteRT and ONNX drivers' percentile rule (``ranges.py``), and the export
keeps the one closer to the float model on the calibration photos. Neither wins everywhere: on
three MobileNetV3-Small runs, held-out KL 0.0056 / 0.0048 / 0.0150 with the histogram and 0.0094 /
0.0118 / 0.0063 with the percentile rule, and the calibration photos picked the better one each time.

Each model is quantized as it is and with its biases corrected for the int8 rounding of its
weights (``bias_correction.py``): held-out KL of the kept candidate 0.0056 / 0.0051 / 0.0064 / 0.0011
-> 0.0052 / 0.0051 / 0.0064 / 0.0007 on three MobileNetV3-Small runs and an EfficientNet-Lite0 one.
Corrected alone it was worse on one of them (0.0064 -> 0.0093), so the calibration photos decide,
among four candidates. The manifest records the one kept (``int8_candidate``), and a head change
quantizes only that one (``export_chosen``): the backbone it was chosen for is the same.

ReLU6 (``hardtanh``) after a conv is quantized the way the quantizer quantizes conv -> ReLU: one
observer on the clamp's output. Out of the box hardtanh shares its input's observer, so every
conv of a ReLU6 network (EfficientNet-Lite0) was quantized over its pre-clamp range, often ten
times wider than [0, 6]: val top-1 88.9 % against 93.9 % in PyTorch; 93.4 % with the observer
after the clamp. XNNPACK fuses the clamp into the conv either way.

The tensor before a hardswish or hardsigmoid (a conv's output) is observed only over the interval
the activation resolves (``ranges.py``: hardswish is 0 below -3), as the LiteRT and ONNX drivers'
ranges do.

Out of the box the quantizer and the XNNPACK partitioner leave two ops in float between
dequantize and quantize steps: the zero pad of the ``tf_`` models' "SAME" convs (five, on tensors up
to 112x112x96) and MobileNetV3's hardswish. XNNPACK then converts int8 -> float -> int8 around
each, and the INT8 ``.pte`` ran no faster than the fp32 one. Both are exact in int8 (a pad copies
values and inserts the zero point; XNNPACK's int8 hardswish is a table of the 256 dequantize ->
hardswish -> quantize results), so the pad now shares its input's quantization, hardswish gets an
int8 input and output, and the partitioner takes both in int8.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
from executorch.backends.xnnpack.partition.config.generic_node_configs import ConstantPadConfig, HardswishConfig
from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    CONV_TARGETS,
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from executorch.exir import EdgeProgramManager, to_edge_transform_and_lower
from executorch.exir._serialize._program import deserialize_pte_binary
from torch import nn
from torchao.quantization.pt2e.observer import HistogramObserver
from torchao.quantization.pt2e.prepare import _create_obs_or_fq_from_qspec
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationConfig,
    QuantizationSpec,
    SharedQuantizationSpec,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from edge.head import float32_bytes
from edge.runtimes import ExecuTorchRunner as Runner  # noqa: F401  (the driver interface)
from edge.runtimes import softmax
from pipeline.export import check_precision, mean_kl, xnnpack_head
from pipeline.export.bias_correction import bias_corrected, corrected_head_bias
from pipeline.export.ranges import HARDSIGMOID_INPUT, HARDSWISH_INPUT, clip_to, percentile_range


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    """A contract model (uint8 NHWC in) as an XNNPACK ``.pte``; batch 1, like every artefact."""
    return export_chosen(model, precision, calibration)[0]


def export_chosen(model: nn.Module, precision: str, calibration: np.ndarray,
                  choice: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """``export``, and what it chose, for the manifest: INT8's candidate (``int8_candidate``: bias
    corrected or not, range rule). Given a previous export's ``choice`` (a head change: the same
    backbone), that candidate is quantized alone instead of choosing among four again."""
    check_precision(precision)
    model = model.eval()
    facts: dict[str, Any] = {}
    if precision == "int8":
        model, facts["int8_candidate"] = _closest_int8(model, calibration, choice)
    return lower(_exported(model, calibration)).to_executorch().buffer, facts


def with_new_head(payload: bytes, weight: np.ndarray, bias: np.ndarray,
                  calibration_features: np.ndarray | None = None,
                  choice: dict[str, Any] | None = None) -> bytes | None:
    """A head change's ``.pte``: ``payload`` (a ``.pte`` this driver wrote) with the classifier
    ``weight`` [classes, features] and ``bias`` written into its XNNPACK graph (``xnnpack_head.py``),
    for any class count; None if it holds no classifier that fits (the export lowers then).

    fp32 without ``calibration_features``. INT8 with them (the calibration photos' embeddings, the
    classifier's input) and ``choice``, the candidate the source's export kept (``int8_candidate``):
    the classifier is quantized as that candidate's PT2E conversion quantizes it (bias corrected or
    not, XNNPACKQuantizer's weight observer, the logits observed by the candidate's range rule, the
    int32 bias at input x weight scale as XNNPACK's serializer quantizes it)."""
    pte = deserialize_pte_binary(payload)
    classifier = xnnpack_head.find_classifier(pte)
    int8 = calibration_features is not None
    if (classifier is None or classifier.precision != ("int8" if int8 else "fp32") or weight.ndim != 2
            or weight.shape[1] != classifier.shape[1] or len(bias) != len(weight)):
        return None
    if not int8:
        head = xnnpack_head.Head(float32_bytes(weight), float32_bytes(bias))
    elif choice is None or calibration_features.shape[1] != weight.shape[1]:
        return None
    else:
        head = _int8_head(weight, bias, calibration_features, choice, classifier.input_quantization[0])
    return xnnpack_head.with_new_head(pte, classifier, head, len(bias))


def _int8_head(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, choice: dict[str, Any],
               input_scale: float) -> xnnpack_head.Head:
    """``with_new_head``'s INT8 classifier: its quantization as the chosen candidate's conversion."""
    _check_choice(choice)
    config = _config(histogram=choice["range_rule"] == "histogram")
    used_bias = corrected_head_bias(weight, bias, features) if choice["bias_corrected"] else bias
    spec = config.weight
    weight_observer = _create_obs_or_fq_from_qspec(spec, {}, False)  # as prepare_pt2e makes them
    weight_tensor = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
    weight_observer(weight_tensor)
    weight_scale, weight_zero_point = weight_observer.calculate_qparams()
    weight_q = torch.ops.quantized_decomposed.quantize_per_channel(
        weight_tensor, weight_scale, weight_zero_point, spec.ch_axis, spec.quant_min, spec.quant_max, torch.int8)
    bias_scale = weight_scale.float() * input_scale  # float32, as XNNPACK's serializer computes it
    bias_q = torch.ops.quantized_decomposed.quantize_per_channel(
        torch.from_numpy(np.asarray(used_bias, np.float32)), bias_scale, torch.zeros_like(weight_zero_point), 0,
        -2**31, 2**31 - 1, torch.int32)
    output_observer = _create_obs_or_fq_from_qspec(config.output_activation, {}, False)
    output_observer.rule = choice["range_rule"]
    logits = features.astype(np.float32) @ weight.T.astype(np.float32) + np.asarray(used_bias, np.float32)
    for row in logits:  # one photo per call, as the calibration runs
        output_observer(torch.from_numpy(row[None]))
    output_scale, output_zero_point = output_observer.calculate_qparams()
    return xnnpack_head.Head(weight_q.numpy().tobytes(), bias_q.numpy().astype("<i4").tobytes(),
                             float32_bytes(weight_scale.numpy()), float32_bytes(bias_scale.numpy()),
                             (float(output_scale), int(output_zero_point)))


def _exported(model: nn.Module, calibration: np.ndarray) -> torch.export.ExportedProgram:
    """``model`` (in eval mode already: a PT2E-converted module refuses ``.eval()``) at batch 1."""
    return torch.export.export(model, (torch.from_numpy(np.array(calibration[:1])),), strict=False)


CLAMPS = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}
SATURATING = {  # activation -> the interval of its input it resolves (ranges.py)
    torch.ops.aten.hardswish.default: HARDSWISH_INPUT, torch.ops.aten.hardswish_.default: HARDSWISH_INPUT,
    torch.ops.aten.hardsigmoid.default: HARDSIGMOID_INPUT, torch.ops.aten.hardsigmoid_.default: HARDSIGMOID_INPUT,
}
HARDSWISHES = {torch.ops.aten.hardswish.default, torch.ops.aten.hardswish_.default}
PADS = {torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default}


# Activation range rules tried for each INT8 export; neither wins everywhere (module docstring).
RANGE_RULES = ("histogram", "percentile")


class RangeObserver(HistogramObserver):
    """One calibration pass, both activation range rules; ``rule`` picks the one
    ``calculate_qparams`` (and so ``convert_pt2e``) uses:

    - ``histogram``: PT2E's histogram observer (the range that minimizes the rounding error over
      all calibration values), on the tensor clamped to ``[low, high]``, the interval its only
      reader, a saturating activation, resolves (default: no clamp);
    - ``percentile``: the LiteRT and ONNX drivers' rule (``ranges.py``), the 99th percentile of
      per-photo extremes (calibration runs one photo per call), clipped to ``[low, high]``.

    ``keep_histogram=False`` (the rule known to be ``percentile``: a head change reusing its source's
    choice) skips the histogram: about half of the calibration pass's time.
    """

    def __init__(self, low: float = -math.inf, high: float = math.inf, keep_histogram: bool = True,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.low, self.high = low, high
        self.keep_histogram = keep_histogram
        self.rule = RANGE_RULES[0] if keep_histogram else "percentile"
        self.photo_mins: list[np.ndarray] = []
        self.photo_maxs: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_detached = x.detach()
        self.photo_mins.append(x_detached.min().numpy())
        self.photo_maxs.append(x_detached.max().numpy())
        if self.keep_histogram:
            clamped = math.isfinite(self.low) or math.isfinite(self.high)
            super().forward(x.clamp(self.low, self.high) if clamped else x)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rule == "histogram":
            return super().calculate_qparams()
        low, high = clip_to(*percentile_range(self.photo_mins, self.photo_maxs), (self.low, self.high))
        return self._calculate_qparams(torch.as_tensor(low), torch.as_tensor(high))


class ActivationAwareQuantizer(XNNPACKQuantizer):
    """XNNPACKQuantizer with conv -> hardtanh observed after the clamp, the input of hardswish and
    hardsigmoid observed only where they are not constant, and pad and hardswish quantized (see the
    module docstring)."""

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().annotate(model)
        for node in model.graph.nodes:  # in graph order: a hardswish is annotated before a pad reading it
            if node.op != "call_function":
                continue
            if node.target in CLAMPS:
                _observe_after_clamp(node)
            elif node.target in SATURATING:
                _observe_within(node.args[0], SATURATING[node.target])
            if node.target in HARDSWISHES:
                _quantize_in_and_out(node, self.global_config.output_activation)
            elif node.target in PADS:
                _share_input_quantization(node)
        return model


def _observe_after_clamp(clamp: torch.fx.Node) -> None:
    """Move a conv's output observer to the clamp (ReLU6) that is its only reader."""
    conv = clamp.args[0]
    annotation = conv.meta.get(Q_ANNOTATION_KEY)
    if (conv.target not in CONV_TARGETS or len(conv.users) > 1 or annotation is None
            or annotation.output_qspec is None):
        return
    clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=annotation.output_qspec, _annotated=True)
    annotation.output_qspec = None


def _observe_within(node: torch.fx.Node, interval: tuple[float, float]) -> None:
    """Give ``node``'s output observer the interval, if the activation is its only reader."""
    annotation = node.meta.get(Q_ANNOTATION_KEY)
    if annotation is None or annotation.output_qspec is None or len(node.users) > 1:
        return
    spec = annotation.output_qspec
    annotation.output_qspec = _observed_by(spec, low=interval[0], high=interval[1])


def _observed_by(spec: QuantizationSpec, observer: type | None = None,
                 **arguments: float | bool) -> QuantizationSpec:
    """``spec`` with its observer (or ``observer``) given more arguments, keeping the config's (eps).
    torchao reads the observer class off a one-level ``with_args`` wrapper, so rebuild that."""
    current = spec.observer_or_fake_quant_ctr.p
    wrapper = (observer or current.func).with_args(**current.keywords, **arguments)
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=wrapper)


def _quantize_in_and_out(node: torch.fx.Node, output_qspec: object) -> None:
    """An int8 op: its input keeps the producer's quantization, its output gets its own observer.
    Left in float where the producer is not quantized."""
    source = node.args[0]
    if _output_qspec(source) is None:
        return
    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
        input_qspec_map={source: SharedQuantizationSpec(source)}, output_qspec=output_qspec, _annotated=True)


def _share_input_quantization(node: torch.fx.Node) -> None:
    """A value-preserving op (pad) in int8: input and output share the producer's quantization."""
    source = node.args[0]
    if _output_qspec(source) is None:
        return
    shared = SharedQuantizationSpec(source)
    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
        input_qspec_map={source: shared}, output_qspec=shared, _annotated=True)


def _output_qspec(node: object) -> object:
    annotation = node.meta.get(Q_ANNOTATION_KEY) if isinstance(node, torch.fx.Node) else None
    return None if annotation is None else annotation.output_qspec


class Int8ConstantPadConfig(ConstantPadConfig):
    def supported_precision_types(self) -> list[ConfigPrecisionType]:
        return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]


class Int8HardswishConfig(HardswishConfig):
    def supported_precision_types(self) -> list[ConfigPrecisionType]:
        return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]


# XNNPACK's partitioner configs, with pad and hardswish also taken in int8 (module docstring)
PARTITIONER_CONFIGS = [{ConstantPadConfig: Int8ConstantPadConfig, HardswishConfig: Int8HardswishConfig}.get(c, c)
                       for c in ALL_PARTITIONER_CONFIGS]


def _closest_int8(model: nn.Module, calibration: np.ndarray,
                  choice: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Quantized four ways: the model as it is and bias-corrected (``bias_correction.py``), each with
    both activation range rules (one calibration pass per model). Kept: the one whose logits on the
    calibration photos are closer to the float model's (mean KL), as the ONNX driver picks its
    weight bits; returned with its description. Given ``choice`` (such a description), only that one."""
    if choice is not None:
        _check_choice(choice)
        variant = bias_corrected(model, calibration) if choice["bias_corrected"] else model
        return _quantize(_exported(variant, calibration), calibration, choice["range_rule"]), dict(choice)
    reference = softmax(_logits(model, calibration))
    candidates = []
    for corrected, variant in ((False, model), (True, bias_corrected(model, calibration))):
        calibrated = _calibrated(_exported(variant, calibration), calibration)
        candidates += [(_converted(calibrated, rule), {"bias_corrected": corrected, "range_rule": rule})
                       for rule in RANGE_RULES]
    return min(candidates, key=lambda candidate: mean_kl(reference, softmax(_logits(candidate[0], calibration))))


def _check_choice(choice: dict[str, Any]) -> None:
    """A recorded ``int8_candidate`` names one of the four candidates ``_closest_int8`` builds."""
    if set(choice) != {"bias_corrected", "range_rule"} or choice["range_rule"] not in RANGE_RULES:
        raise ValueError(f"int8_candidate {choice!r}: expected bias_corrected and a range_rule of "
                         f"{list(RANGE_RULES)}")


def _logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # batch 1: the exported shape
        return torch.cat([model(torch.from_numpy(np.array(image[None]))) for image in images]).numpy()


def _quantize(exported: torch.export.ExportedProgram, calibration: np.ndarray,
              rule: str = RANGE_RULES[0]) -> nn.Module:
    """PT2E with one activation range rule: calibrate (the histogram only where the rule needs it),
    convert."""
    return _converted(_calibrated(exported, calibration, histogram=rule == "histogram"), rule)


def _calibrated(exported: torch.export.ExportedProgram, calibration: np.ndarray,
                histogram: bool = True) -> torch.fx.GraphModule:
    """PT2E: prepared with the activation-aware XNNPACKQuantizer, activations observed by
    ``RangeObserver`` (with its histogram, or per-photo extremes only), the calibration photos run
    through it."""
    prepared = prepare_pt2e(exported.module(), ActivationAwareQuantizer().set_global(_config(histogram)))
    with torch.no_grad():
        for image in calibration:  # batch 1: the exported shape
            prepared(torch.from_numpy(np.array(image[None])))
    return prepared


def _config(histogram: bool = True) -> QuantizationConfig:
    """XNNPACKQuantizer's per-channel symmetric config with activations observed by ``RangeObserver``."""
    config = get_symmetric_quantization_config(is_per_channel=True)
    return dataclasses.replace(
        config, input_activation=_observed_by(config.input_activation, RangeObserver, keep_histogram=histogram),
        output_activation=_observed_by(config.output_activation, RangeObserver, keep_histogram=histogram))


def _converted(calibrated: torch.fx.GraphModule, rule: str) -> nn.Module:
    """A quantized copy of a calibrated model, its activations ranged by ``rule``."""
    if rule not in RANGE_RULES:
        raise ValueError(f"unknown activation range rule {rule!r}: expected one of {list(RANGE_RULES)}")
    prepared = copy.deepcopy(calibrated)  # convert_pt2e replaces the observers in place
    for module in prepared.modules():
        if isinstance(module, RangeObserver):
            module.rule = rule
    return convert_pt2e(prepared)


def lower(exported: torch.export.ExportedProgram) -> EdgeProgramManager:
    """The program with what XNNPACK takes delegated to it (``.to_executorch().buffer`` is the .pte)."""
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner(configs=PARTITIONER_CONFIGS)])
