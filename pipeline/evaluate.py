"""Evaluation: top-1, per-class precision/recall/F1, confusion matrix (CSV + PNG), calibration error.

Works on the run's val split or on any class-folder dataset (a held-out test set is scored this
way), always through the input contract: uint8 center crops into the model wrapper.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.manifest import write_bytes_atomic, write_json_atomic


@torch.inference_mode()
def predict_probs(model: nn.Module, images: np.ndarray, batch_size: int = 64,
                  progress: bool = False) -> np.ndarray:
    """Softmax probabilities of a contract model on uint8 NHWC images."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="evaluate", leave=False,
                      disable=not progress):
        x = torch.from_numpy(np.array(images[start:start + batch_size]))  # a writable copy
        out.append(torch.softmax(model(x).float(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by bin size."""
    if len(labels) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(ece)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1, per-class precision/recall/F1/support, confusion matrix (rows true, columns predicted)."""
    k = len(classes)
    preds = probs.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(actual)}
    return {
        "count": int(len(labels)),
        "top1": float((preds == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "ece": expected_calibration_error(probs, labels),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": classes,
    }


def write_report(metrics: dict[str, Any], out_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
    """metrics.json, confusion.csv and confusion.png in ``out_dir`` (each written atomically)."""
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "metrics.json", {**(extra or {}), **metrics})
    classes, confusion = metrics["classes"], metrics["confusion"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true\\predicted", *classes])
    for name, row in zip(classes, confusion):
        writer.writerow([name, *row])
    write_bytes_atomic(out_dir / "confusion.csv", buf.getvalue().encode())
    write_bytes_atomic(out_dir / "confusion.png", confusion_png(np.array(confusion), classes,
                                                                metrics["top1"]))


def confusion_png(confusion: np.ndarray, classes: list[str], top1: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2, 1.1 * k + 1.5))
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {top1:.1%}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def format_summary(metrics: dict[str, Any]) -> str:
    """A short table for the terminal."""
    lines = [f"top-1 {metrics['top1']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
             f"ECE {metrics['ece']:.4f}  (n={metrics['count']})",
             f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, c in metrics["per_class"].items():
        lines.append(f"{name:<14}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}"
                     f"{c['support']:>9}")
    return "\n".join(lines)
