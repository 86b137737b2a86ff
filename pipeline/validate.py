"""The parity gate: every artefact, run in its real runtime, against the PyTorch model on val.

An artefact passes when it behaves like the model it came from: fp32 artefacts must agree with
PyTorch's top-1 on (nearly) every photo; INT8 artefacts may lose a little accuracy, never more
than the threshold. What fails is not shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluate import compute_metrics


@dataclass(frozen=True)
class Thresholds:
    fp32_min_agreement: float = 0.995  # share of val photos with PyTorch's top-1
    int8_max_top1_drop: float = 0.015  # val top-1 below PyTorch's, as a fraction (1.5 pp)


def parity(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """An artefact's val metrics and how closely it follows the reference (PyTorch) probabilities."""
    metrics = compute_metrics(labels, probs, classes)
    return {
        "top1": metrics["top1"],
        "macro_f1": metrics["macro_f1"],
        "per_class_f1": {name: c["f1"] for name, c in metrics["per_class"].items()},
        "agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
        "max_prob_diff": float(np.abs(probs - reference).max()),
        "count": metrics["count"],
    }


def gate(result: dict[str, Any], reference_top1: float, precision: str, thresholds: Thresholds) -> str | None:
    """Why an artefact fails its thresholds, or None when it passes."""
    if precision == "fp32" and result["agreement"] < thresholds.fp32_min_agreement:
        return (f"top-1 agrees with PyTorch on {result['agreement']:.2%} of val photos, "
                f"below the {thresholds.fp32_min_agreement:.2%} required of fp32")
    if precision == "int8":
        drop = reference_top1 - result["top1"]
        if drop > thresholds.int8_max_top1_drop:
            return (f"val top-1 {result['top1']:.2%} is {drop * 100:.2f} pp below PyTorch's "
                    f"{reference_top1:.2%} (at most {thresholds.int8_max_top1_drop * 100:.2f} pp allowed)")
    return None
