"""Run a bundle's artefacts in their real runtimes: one runner per format, one interface.

``open_runner(format, path, threads)`` gives an object with ``runner(images) -> logits`` (a uint8
NHWC batch in, float32 logits out, one photo at a time: every artefact is batch 1) and
``runner.io`` (its input/output tensors: name, shape, dtype, quantization). The export pipeline
gates artefacts with these same runners, so what is validated on a device is what was shipped.

Imports stay lazy: a Raspberry Pi has only the LiteRT runtime, a Jetson only onnxruntime. Of the
three, only the ExecuTorch runtime pulls in torch (its Python bindings take torch tensors).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("tflite", "executorch", "onnx")
SUFFIX = {"tflite": ".tflite", "executorch": ".pte", "onnx": ".onnx"}


class RuntimeMissing(RuntimeError):
    """No runtime for an artefact format is installed here."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@contextlib.contextmanager
def captured_output() -> Iterator[None]:
    """Send what native code and Python print to stdout/stderr into a temp file for the duration
    (converters print pages of progress, runtimes their CPU probing); replay it on stderr if the
    body raises."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            if failed:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-20000:])


def quiet_executorch_imports() -> None:
    """ExecuTorch pulls in torchao, which logs "Failed to load ... .so" (CUDA kernels) and "no
    triton" on every CPU-only import, and torch then logs that torchao registers an Enum the
    deprecated way. None of it concerns exporting or running a .pte, and "Failed to load" in our
    output reads like our failure; errors still show."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(_not_the_enum_deprecation)  # kept once if called again


def _not_the_enum_deprecation(record: logging.LogRecord) -> bool:
    return "is an Enum subclass" not in record.getMessage()


# --- LiteRT (.tflite) -------------------------------------------------------------------------

def tflite_interpreter_class() -> Any:
    """ai-edge-litert's Interpreter, or tflite-runtime's where that is what the device has."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise RuntimeMissing("no LiteRT runtime: pip install ai-edge-litert") from None
    return Interpreter


class TFLiteRunner:
    """A ``.tflite`` in the LiteRT interpreter. A full-integer INT8 model takes int8 pixels
    (scale 1, zero point -128) and gives int8 logits: both are mapped here from/to the contract."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        interpreter_class = tflite_interpreter_class()
        self.interpreter = interpreter_class(model_content=Path(path).read_bytes(), num_threads=threads)
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
        return {"inputs": [_tflite_tensor_info(self.input)], "outputs": [_tflite_tensor_info(self.output)]}


def _tflite_tensor_info(detail: dict[str, Any]) -> dict[str, Any]:
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


# --- ExecuTorch (.pte) ------------------------------------------------------------------------

# ExecuTorch's ScalarType codes for the dtypes an artefact can take or give.
_EXECUTORCH_DTYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 6: "float32"}


class ExecuTorchRunner:
    """A ``.pte`` in the ExecuTorch runtime (XNNPACK delegate)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        quiet_executorch_imports()
        try:
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError:
            raise RuntimeMissing("no ExecuTorch runtime: pip install executorch") from None
        import torch

        self._from_numpy = torch.from_numpy
        with captured_output():  # XNNPACK prints its CPU probing when a method loads
            if threads:  # XNNPACK's shared threadpool; the runtime offers no per-method setting
                portable_lib._unsafe_reset_threadpool(threads)
            self.program = Runtime.get().load_program(Path(path))
            self.method = self.program.load_method("forward")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.method.execute([self._from_numpy(np.array(img[None]))])[0].numpy() for img in images]
        return np.concatenate(out).astype(np.float32)

    @property
    def io(self) -> dict[str, list[dict[str, Any]]]:
        meta = self.method.metadata

        def info(name: str, tensor: Any) -> dict[str, Any]:
            dtype = _EXECUTORCH_DTYPES.get(int(tensor.dtype()), str(tensor.dtype()))
            return {"name": name, "shape": list(tensor.sizes()), "dtype": dtype, "quantization": None}

        return {"inputs": [info(f"input_{i}", meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
                "outputs": [info(f"output_{i}", meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]}


# --- onnxruntime (.onnx) ----------------------------------------------------------------------

ONNX_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def onnx_providers() -> list[str]:
    """TensorRT, then CUDA, then CPU: whichever this onnxruntime build offers (a Jetson has GPU ones)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeMissing("no ONNX runtime: pip install onnxruntime (onnxruntime-gpu on a Jetson)") from None
    available = ort.get_available_providers()
    return [p for p in ONNX_PROVIDER_ORDER if p in available]


class OnnxRunner:
    """An ``.onnx`` in onnxruntime."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        providers = onnx_providers()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.session.run(None, {self.input_name: np.array(img[None])})[0] for img in images]
        return np.concatenate(out).astype(np.float32)

    @property
    def io(self) -> dict[str, list[dict[str, Any]]]:
        def info(arg: Any) -> dict[str, Any]:
            dtype = arg.type.removeprefix("tensor(").removesuffix(")")  # "tensor(float)" -> "float"
            dtype = {"float": "float32", "double": "float64"}.get(dtype, dtype)
            return {"name": arg.name, "shape": list(arg.shape), "dtype": dtype, "quantization": None}

        return {"inputs": [info(a) for a in self.session.get_inputs()],
                "outputs": [info(a) for a in self.session.get_outputs()]}


RUNNERS = {"tflite": TFLiteRunner, "executorch": ExecuTorchRunner, "onnx": OnnxRunner}


def open_runner(fmt: str, path: str | Path, threads: int | None = None) -> Any:
    if fmt not in RUNNERS:
        raise ValueError(f"unknown artefact format {fmt!r}: expected one of {list(FORMATS)}")
    return RUNNERS[fmt](path, threads)


# --- which artefact to run here ---------------------------------------------------------------

def installed_formats() -> list[str]:
    """Formats whose runtime is importable here, checked without importing them (torch is heavy)."""
    modules = {"tflite": ("ai_edge_litert", "tflite_runtime"), "executorch": ("executorch",),
               "onnx": ("onnxruntime",)}
    return [fmt for fmt in FORMATS if any(importlib.util.find_spec(m) for m in modules[fmt])]


def _onnx_has_gpu() -> bool:
    try:
        return onnx_providers()[0] != "CPUExecutionProvider"
    except (RuntimeMissing, IndexError):
        return False


def choose_artefact(manifest: dict[str, Any], backend: str | None = None, model: str | None = None,
                    formats: list[str] | None = None) -> dict[str, Any]:
    """The manifest entry to run: ``model`` (a file name) if given, else the best one whose runtime is
    installed (``backend`` narrows the format). A GPU onnxruntime (a Jetson) prefers ONNX fp32;
    otherwise LiteRT, then ExecuTorch, then ONNX, INT8 before fp32 (smaller, built for Arm)."""
    artefacts = manifest.get("artefacts", [])
    if model is not None:
        for entry in artefacts:
            if entry["file"] == Path(model).name:
                return entry
        raise LookupError(f"{model}: not an artefact of this bundle (it has {[a['file'] for a in artefacts]})")
    formats = installed_formats() if formats is None else formats
    if backend is not None:
        if backend not in FORMATS:
            raise ValueError(f"unknown backend {backend!r}: expected one of {list(FORMATS)}")
        if backend not in formats:
            raise RuntimeMissing(f"backend {backend!r} asked for, but its runtime is not installed here")
        formats = [backend]
    if not formats:
        raise RuntimeMissing("no runtime installed: pip install ai-edge-litert (or onnxruntime, executorch)")
    gpu = "onnx" in formats and _onnx_has_gpu()
    order = []
    for fmt in (["onnx"] if gpu else []) + [f for f in FORMATS if f in formats]:
        for precision in (("fp32", "int8") if gpu and fmt == "onnx" else ("int8", "fp32")):
            order.append((fmt, precision))
    for fmt, precision in dict.fromkeys(order):
        for entry in artefacts:
            if entry["format"] == fmt and entry["precision"] == precision:
                return entry
    raise LookupError(f"the bundle has no artefact for the runtimes installed here ({', '.join(formats)}); "
                      f"it has {[a['file'] for a in artefacts]}")


def machine() -> str:
    return f"{platform.system()} {platform.machine()}"


def measure_latency(runner: Any, image: np.ndarray, warmup: int = 5, runs: int = 30) -> dict[str, float]:
    """Batch-1 latency in ms: median and p90 over ``runs`` after ``warmup``."""
    return measure_latencies([runner], image, warmup, runs)[0]


def measure_latencies(runners: list[Any], image: np.ndarray, warmup: int = 5, runs: int = 30,
                      rounds: int = 1) -> list[dict[str, float]]:
    """``measure_latency`` of each runner. With ``rounds`` > 1 they take turns, ``runs / rounds`` at
    a time, so that a machine still warming up (or busy for a moment) weighs on all of them alike,
    not on whichever ran first: timed first and alone, PyTorch eager once took 9.1 ms where it takes
    5.7-5.8 ms warm."""
    batch = image[None]
    for runner in runners:
        for _ in range(warmup):
            runner(batch)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for runner, own in zip(runners, times):
            for _ in range(max(1, runs // rounds)):
                t0 = time.perf_counter()
                runner(batch)
                own.append((time.perf_counter() - t0) * 1000)
    return [{"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
            for t in times]
