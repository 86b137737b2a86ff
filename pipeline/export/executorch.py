"""ExecuTorch driver: ``torch.export`` -> XNNPACK-lowered ``.pte`` (fp32, and INT8 through PT2E).

INT8 uses ``XNNPACKQuantizer`` (per-channel symmetric weights, per-tensor activations), calibrated
on real preprocessed training photos, never random tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


class Runner:
    """Runs a ``.pte`` in the ExecuTorch runtime: uint8 NHWC batch -> logits."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if threads:  # XNNPACK's shared threadpool; the runtime offers no per-method setting
            portable_lib._unsafe_reset_threadpool(threads)
        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.method.execute([torch.from_numpy(np.array(img[None]))])[0].numpy()
               for img in images]
        return np.concatenate(out).astype(np.float32)

    @property
    def io(self) -> dict[str, list[dict[str, Any]]]:
        meta = self.method.metadata
        return {
            "inputs": [_tensor_info(f"input_{i}", meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
            "outputs": [_tensor_info(f"output_{i}", meta.output_tensor_meta(i))
                        for i in range(meta.num_outputs())],
        }


def _tensor_info(name: str, info: Any) -> dict[str, Any]:
    # ExecuTorch's ScalarType codes for the dtypes an artefact can take or give.
    dtypes = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 6: "float32"}
    return {"name": name, "shape": list(info.sizes()), "dtype": dtypes.get(int(info.dtype()), str(info.dtype())),
            "quantization": None}
