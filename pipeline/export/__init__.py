"""Export drivers, one module per format, and the registry of artefacts a bundle holds.

Every driver module has the same small interface (as timm's model families do):

- ``export(model, precision, calibration) -> bytes``: a contract model (uint8 NHWC in, logits out)
  as a serialized artefact; ``calibration`` is real preprocessed photos (uint8 NHWC) for INT8.
- ``Runner(path, threads=None)``: runs the artefact in its real runtime; ``runner(images)`` maps a
  uint8 NHWC batch to float logits, and ``runner.io`` describes its input/output tensors
  (name, shape, dtype, quantization) for the manifest.
- optionally ``describe(payload) -> dict``: manifest facts only the file knows (the ONNX INT8
  weight bits).
- optionally ``export_chosen(model, precision, calibration, choice=None) -> (bytes, facts)``: where
  an export chooses between candidates (the ExecuTorch INT8 ``.pte``), what it chose, for the
  manifest; a head change passes the source bundle's choice back to skip choosing again.
- optionally ``with_new_head(payload, weight, bias, calibration_features=None, choice=None) -> bytes
  | None``: a head change's artefact written from the source bundle's (the new classifier in its last
  op; INT8 quantizes it over the calibration photos' embeddings, as the source's export chose to,
  ``choice``, where it chose) instead of converted again; None where the file does not allow it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from edge.runtimes import quiet_executorch_imports

quiet_executorch_imports()  # before any driver imports torchao (see there)

PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class ArtefactSpec:
    format: str  # the driver module: executorch | tflite | onnx
    precision: str  # fp32 | int8
    file: str

    @property
    def key(self) -> str:
        return f"{self.format}-{self.precision}"


ARTEFACTS: tuple[ArtefactSpec, ...] = (
    ArtefactSpec("executorch", "fp32", "model_fp32.pte"),
    ArtefactSpec("executorch", "int8", "model_int8.pte"),
    ArtefactSpec("tflite", "fp32", "model_fp32.tflite"),
    ArtefactSpec("tflite", "int8", "model_int8.tflite"),
    ArtefactSpec("onnx", "fp32", "model_fp32.onnx"),
    ArtefactSpec("onnx", "int8", "model_int8.onnx"),
)
FORMATS = tuple(dict.fromkeys(a.format for a in ARTEFACTS))


def driver(fmt: str) -> ModuleType:
    """The driver module of a format (imported on demand: each pulls in a heavy toolchain)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown artefact format {fmt!r}: expected one of {list(FORMATS)}")
    return importlib.import_module(f"pipeline.export.{fmt}")


def select(keys: str | None) -> tuple[ArtefactSpec, ...]:
    """Artefacts named by a comma list of ``format`` or ``format-precision`` (None: all)."""
    if not keys:
        return ARTEFACTS
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    chosen = [a for a in ARTEFACTS if a.key in wanted or a.format in wanted]
    unknown = [k for k in wanted if not any(k in (a.key, a.format) for a in ARTEFACTS)]
    if unknown or not chosen:
        raise ValueError(f"unknown artefact(s) {unknown}: choose from {[a.key for a in ARTEFACTS]}")
    return tuple(chosen)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {list(PRECISIONS)}")


def mean_kl(reference: np.ndarray, probs: np.ndarray) -> float:
    """Mean KL divergence of ``probs`` from ``reference`` (rows of probabilities): how INT8 drivers
    pick between candidates on the calibration photos."""
    eps = 1e-9
    return float((reference * (np.log(reference + eps) - np.log(probs + eps))).sum(1).mean())
