"""ExecuTorch driver: ``torch.export`` -> XNNPACK-lowered ``.pte`` (fp32, and INT8 through PT2E).

INT8 uses ``XNNPACKQuantizer`` (per-channel symmetric weights, per-tensor activations), calibrated
on real preprocessed training photos, never random tensors.

ReLU6 (``hardtanh``) after a conv is quantized the way the quantizer quantizes conv -> ReLU: one
observer on the clamp's output. Out of the box hardtanh shares its input's observer, so every
conv of a ReLU6 network (EfficientNet-Lite0) was quantized over its pre-clamp range, often ten
times wider than [0, 6]: val top-1 88.9 % against 93.9 % in PyTorch; 93.4 % with the observer
after the clamp. XNNPACK fuses the clamp into the conv either way.

Hardswish and hardsigmoid are not quantized ops here: the tensor before them (a conv's output) is
observed, over all of its range. Its observer now sees only the interval the activation resolves
(``ranges.py``: hardswish is 0 below -3), as the LiteRT and ONNX drivers' ranges do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    CONV_TARGETS,
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from torch import nn
from torchao.quantization.pt2e.observer import HistogramObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from edge.runtimes import ExecuTorchRunner as Runner  # noqa: F401  (the driver interface)
from pipeline.export import check_precision
from pipeline.export.ranges import HARDSIGMOID_INPUT, HARDSWISH_INPUT


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    """A contract model (uint8 NHWC in) as an XNNPACK ``.pte``; batch 1, like every artefact."""
    check_precision(precision)
    example = torch.from_numpy(np.array(calibration[:1]))
    exported = torch.export.export(model.eval(), (example,), strict=False)
    if precision == "int8":
        exported = torch.export.export(_quantize(exported, calibration), (example,), strict=False)
    return _lower(exported)


CLAMPS = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}
SATURATING = {  # activation -> the interval of its input it resolves (ranges.py)
    torch.ops.aten.hardswish.default: HARDSWISH_INPUT, torch.ops.aten.hardswish_.default: HARDSWISH_INPUT,
    torch.ops.aten.hardsigmoid.default: HARDSIGMOID_INPUT, torch.ops.aten.hardsigmoid_.default: HARDSIGMOID_INPUT,
}


class SaturationObserver(HistogramObserver):
    """Observes a tensor clamped to the interval its only reader, a saturating activation, resolves."""

    def __init__(self, low: float, high: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        super().forward(x.clamp(self.low, self.high))
        return x


class ActivationAwareQuantizer(XNNPACKQuantizer):
    """XNNPACKQuantizer with conv -> hardtanh observed after the clamp, and the input of hardswish
    and hardsigmoid observed only where they are not constant (see the module docstring)."""

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().annotate(model)
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in CLAMPS:
                _observe_after_clamp(node)
            elif node.op == "call_function" and node.target in SATURATING:
                _observe_within(node.args[0], SATURATING[node.target])
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
    observer = SaturationObserver.with_args(low=interval[0], high=interval[1],
                                            **spec.observer_or_fake_quant_ctr.p.keywords)
    annotation.output_qspec = dataclasses.replace(spec, observer_or_fake_quant_ctr=observer)


def _quantize(exported: torch.export.ExportedProgram, calibration: np.ndarray) -> nn.Module:
    """PT2E: prepare with the activation-aware XNNPACKQuantizer, run the calibration photos, convert."""
    quantizer = ActivationAwareQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for image in calibration:  # batch 1: the exported shape
            prepared(torch.from_numpy(np.array(image[None])))
    return convert_pt2e(prepared)


def _lower(exported: torch.export.ExportedProgram) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return program.to_executorch().buffer
