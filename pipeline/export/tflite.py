"""LiteRT driver: litert-torch -> fp32 ``.tflite``; ai-edge-quantizer full-integer INT8 ``.tflite``.

- fp32 takes the contract's uint8 NHWC input (a CAST to float is the graph's first op).
- INT8 is converted from the same model taking float pixels (0..255), then quantized with the
  ``static_wi8_ai8`` recipe and min/max calibration on real photos. The quantizer's default
  calibration update is a moving average, which under-covers the activation ranges of
  MobileNetV3's hardswish layers; the running min/max does not. The input range is pinned to the
  contract's [0, 255], so the input is int8 with scale 1 and zero point -128: a device feeds
  ``pixel - 128`` and no float op is left in the graph.

Tensor names are cut to their last path component (plus the tensor index, to stay unique):
litert-torch writes each tensor's full module path (about 90 KB of strings in MobileNetV3-Small),
which is debug text, not model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.export import check_precision

INPUT_RANGE = (0.0, 255.0)


def export(model: nn.Module, precision: str, calibration: np.ndarray) -> bytes:
    check_precision(precision)
    if precision == "fp32":
        flatbuffer = _convert(model, torch.from_numpy(np.array(calibration[:1])))
    else:
        float_model = _convert(model, torch.from_numpy(calibration[:1].astype(np.float32)))
        flatbuffer = _quantize_int8(float_model, calibration)
    return _short_tensor_names(flatbuffer)


def _convert(model: nn.Module, example: torch.Tensor) -> bytes:
    import litert_torch

    return bytes(litert_torch.convert(model.eval(), (example,)).model_content())


def _quantize_int8(float_model: bytes, calibration: np.ndarray) -> bytes:
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    qt = quantizer.Quantizer(float_model)
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    calib = calibrator.Calibrator(float_model, num_threads=os.cpu_count() or 1,
                                  qsv_update_func=qsv_utils.min_max_update)
    interpreter = _interpreter(float_model)
    signature, spec = next(iter(interpreter.get_signature_list().items()))
    input_arg = spec["inputs"][0]
    samples = [{input_arg: img[None].astype(np.float32)} for img in calibration]
    calib.calibrate({signature: samples}, qt._recipe_manager)  # public calibrate() fixes the update rule
    qsvs = calib.get_model_qsvs()
    input_tensor = interpreter.get_input_details()[0]["name"]
    shape = qsvs[input_tensor]["min"].shape
    qsvs[input_tensor] = {"min": np.full(shape, INPUT_RANGE[0], np.float32),
                          "max": np.full(shape, INPUT_RANGE[1], np.float32)}
    return bytes(qt.quantize(qsvs).quantized_model)


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


class Runner:
    """Runs a ``.tflite`` in the LiteRT interpreter: uint8 NHWC batch -> float logits."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.interpreter = _interpreter(Path(path).read_bytes(), threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for img in images:
            self.interpreter.set_tensor(self.input["index"], quantize(img[None], self.input))
            self.interpreter.invoke()
            out.append(dequantize(self.interpreter.get_tensor(self.output["index"]), self.output))
        return np.concatenate(out).astype(np.float32)

    @property
    def io(self) -> dict[str, list[dict[str, Any]]]:
        return {"inputs": [_tensor_info(self.input)], "outputs": [_tensor_info(self.output)]}


def _tensor_info(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero = detail["quantization"]
    return {"name": detail["name"], "shape": [int(s) for s in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None}


def quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """uint8 pixels into the input tensor's dtype and quantization (identity for uint8 inputs)."""
    scale, zero = detail["quantization"]
    if scale and detail["dtype"] != x.dtype:
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"])


def dequantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    return (x.astype(np.float32) - zero) * scale if scale else x.astype(np.float32)
