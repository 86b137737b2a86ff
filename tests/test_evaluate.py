import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import evaluate


def test_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1],
                      [0.5, 0.1, 0.4]])
    m = evaluate.compute_metrics(labels, probs, ["a", "b", "c"])
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_ece() -> None:
    labels = np.array([0, 0, 0, 0])
    # 0.9-confident and right 3 times out of 4 in one bin: |0.9 - 0.75| = 0.15
    probs = np.array([[0.9, 0.1]] * 4)
    probs_wrong = probs.copy()
    labels_mixed = np.array([0, 0, 0, 1])
    assert evaluate.expected_calibration_error(probs, labels) == pytest.approx(0.1)
    assert evaluate.expected_calibration_error(probs_wrong, labels_mixed) == pytest.approx(0.15)


def test_write_report(tmp_path: Path) -> None:
    m = evaluate.compute_metrics(np.array([0, 1]), np.array([[0.6, 0.4], [0.3, 0.7]]), ["x", "y"])
    evaluate.write_report(m, tmp_path, extra={"split": "val"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["split"] == "val" and saved["top1"] == 1.0
    assert (tmp_path / "confusion.csv").read_text().splitlines() == ["true\\predicted,x,y", "x,1,0", "y,0,1"]
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
