"""ExecuTorch driver: ``torch.export`` -> XNNPACK-lowered ``.pte`` (fp32, and INT8 through PT2E).

INT8 uses ``XNNPACKQuantizer`` (per-channel symmetric weights, per-tensor activations), calibrated
on real preprocessed training photos, never random tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def _lower(exported: torch.export.ExportedProgram) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    return program.to_executorch().buffer


def export_fp32(model: nn.Module, example: torch.Tensor) -> bytes:
    """A contract model (uint8 NHWC in) as an fp32 XNNPACK ``.pte``."""
    return _lower(torch.export.export(model.eval(), (example,), strict=False))


def export_int8(model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
                batch_size: int = 16) -> bytes:
    """PT2E INT8: prepare with XNNPACKQuantizer, run the calibration photos, convert, lower."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(model.eval(), (example,), strict=False).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), batch_size):
            for image in calibration[start:start + batch_size]:  # batch 1: the exported shape
                prepared(torch.from_numpy(np.array(image[None])))
    converted = convert_pt2e(prepared)
    return _lower(torch.export.export(converted, (example,), strict=False))


class Runner:
    """Runs a ``.pte`` in the ExecuTorch runtime: uint8 NHWC batch -> logits."""

    def __init__(self, path: str | Path) -> None:
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.method.execute([torch.from_numpy(np.array(img[None]))])[0].numpy()
               for img in images]
        return np.concatenate(out).astype(np.float32)
