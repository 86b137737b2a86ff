"""ExecuTorch driver: ``torch.export`` -> XNNPACK-lowered ``.pte`` (fp32, and INT8 through PT2E).

INT8 uses ``XNNPACKQuantizer`` (per-channel symmetric weights, per-tensor activations), calibrated
on real preprocessed training photos, never random tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge.runtimes import ExecuTorchRunner as Runner  # noqa: F401  (the driver interface)
from pipeline.export import check_precision


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    """A contract model (uint8 NHWC in) as an XNNPACK ``.pte``; batch 1, like every artefact."""
    check_precision(precision)
    example = torch.from_numpy(np.array(calibration[:1]))
    exported = torch.export.export(model.eval(), (example,), strict=False)
    if precision == "int8":
        exported = torch.export.export(_quantize(exported, calibration), (example,), strict=False)
    return _lower(exported)


def _quantize(exported: torch.export.ExportedProgram, calibration: np.ndarray) -> nn.Module:
    """PT2E: prepare with XNNPACKQuantizer, run the calibration photos, convert."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
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
