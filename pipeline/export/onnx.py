"""ONNX driver (the Jetson path): fp32 ONNX, and INT8 QDQ through onnxruntime static quantization
calibrated on real photos. On a Jetson, onnxruntime's TensorRT or CUDA provider runs either."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.export import check_precision

INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 17


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    check_precision(precision)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        example = torch.from_numpy(np.array(calibration[:1]))
        torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False)
        if precision == "int8":
            path = _quantize_int8(path, calibration, Path(tmp))
        return path.read_bytes()


def _quantize_int8(float_path: Path, calibration: np.ndarray, tmp: Path) -> Path:
    """QDQ INT8 (per-channel weights), min/max calibration over ``calibration`` photos."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            img = next(self.items, None)
            return None if img is None else {INPUT_NAME: np.array(img[None])}

    prepared, out = tmp / "prepared.onnx", tmp / "int8.onnx"
    quant_pre_process(str(float_path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    return out


def providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build offers."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in available]


class Runner:
    """Runs an ``.onnx`` in onnxruntime: uint8 NHWC batch -> logits."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.session.run(None, {INPUT_NAME: np.array(img[None])})[0] for img in images]
        return np.concatenate(out).astype(np.float32)

    @property
    def io(self) -> dict[str, list[dict[str, Any]]]:
        def info(arg: Any) -> dict[str, Any]:
            dtype = arg.type.removeprefix("tensor(").removesuffix(")")  # "tensor(float)" -> "float"
            dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
            return {"name": arg.name, "shape": list(arg.shape), "dtype": dtype, "quantization": None}

        return {"inputs": [info(a) for a in self.session.get_inputs()],
                "outputs": [info(a) for a in self.session.get_outputs()]}
