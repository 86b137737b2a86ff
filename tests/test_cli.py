"""The command line: real runs on tiny data, and one clear line (no traceback) for bad arguments."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import write_dataset

TINY = ["--model", "resnet10t", "--size", "32", "--epochs", "2", "--batch-size", "8", "--threads", "1",
        "--quiet"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def trained_run(tiny_data: Path, tmp_path: Path) -> Path:
    result = run("train", "--data", str(tiny_data), "--no-pretrained", *TINY, "--out", str(tmp_path / "runs"),
                 "--run-name", "r", "--label-smoothing", "0.05", "--mixup", "0.2", "--cutmix", "1.0",
                 "--backbone-lr-scale", "0.5")
    assert result.exit_code == 0, result.output
    assert "val top-1" in result.output
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert (config["label_smoothing"], config["mixup"], config["cutmix"], config["backbone_lr_scale"]) == (
        0.05, 0.2, 1.0, 0.5)
    return tmp_path / "runs" / "r"


def assert_one_line_error(result, *phrases: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def test_help_explains_defaults() -> None:
    for cmd in ("train", "evaluate", "predict"):
        result = run(cmd, "--help")
        assert result.exit_code == 0
    assert "mobilenetv3_small" in run("train", "--help").output
    assert "[default: 40" in run("train", "--help").output


def test_missing_data_folder(tmp_path: Path) -> None:
    result = run("train", "--data", str(tmp_path / "nowhere"), "--no-pretrained", *TINY)
    assert_one_line_error(result, "nowhere: data folder not found")


def test_missing_and_corrupt_weights(tiny_data: Path, tmp_path: Path) -> None:
    result = run("train", "--data", str(tiny_data), "--weights", str(tmp_path / "absent.pth"),
                 "--model", "mobilenetv3_small", "--out", str(tmp_path / "runs"))
    assert_one_line_error(result, "absent.pth: weights file not found")
    corrupt = tmp_path / "broken.pth"
    corrupt.write_bytes(b"\x00" * 100)
    result = run("train", "--data", str(tiny_data), "--weights", str(corrupt), "--out", str(tmp_path / "runs"))
    assert_one_line_error(result, "broken.pth: not a readable PyTorch weights file")


def test_no_weights_without_hub(tiny_data: Path, tmp_path: Path) -> None:
    result = run("train", "--data", str(tiny_data), "--out", str(tmp_path / "runs"))
    assert_one_line_error(result, "Hub is unreachable", "--no-pretrained")


def test_pretrained_from_weights_dir(tiny_data: Path, tmp_path: Path, imagenet_like_weights: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRASHSORT_WEIGHTS_DIR", str(imagenet_like_weights.parent))
    result = run("train", "--data", str(tiny_data), "--model", "mobilenetv3_small", "--size", "32",
                 "--epochs", "1", "--threads", "1", "--quiet", "--out", str(tmp_path / "runs"), "--run-name", "p")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "runs" / "p" / "manifest.json").read_text())
    assert manifest["model"]["weights_source"] == f"file:{imagenet_like_weights.name}"
    assert len(manifest["model"]["weights_sha256"]) == 64


def test_evaluate_on_a_folder_and_class_mismatch(trained_run: Path, tmp_path: Path) -> None:
    test_set = write_dataset(tmp_path / "heldout", per_class=3, seed=7)
    result = run("evaluate", str(trained_run), "--data", str(test_set))
    assert result.exit_code == 0, result.output
    metrics = json.loads((trained_run / "eval-heldout" / "metrics.json").read_text())
    assert metrics["count"] == 9 and metrics["split"] == "heldout"
    assert (trained_run / "eval-heldout" / "confusion.png").is_file()

    shutil.rmtree(test_set / "metal")
    write_dataset(test_set, per_class=3, classes=["battery"])
    result = run("evaluate", str(trained_run), "--data", str(test_set))
    assert_one_line_error(result, "classes do not match the manifest", "missing ['metal']",
                          "not in manifest ['battery']")


def test_evaluate_val_and_predict(trained_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    result = run("evaluate", str(trained_run))
    assert result.exit_code == 0, result.output
    assert json.loads((trained_run / "eval-val" / "metrics.json").read_text())["count"] == 6

    photo = next((tiny_data / "glass").iterdir())
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    result = run("predict", str(photo), str(bad), "--checkpoint", str(trained_run), "--json")
    assert result.exit_code == 0
    line = json.loads(result.stdout.splitlines()[0])
    assert line["image"] == str(photo) and len(line["top"]) == 3
    assert sum(t["probability"] for t in line["top"]) == pytest.approx(1.0, abs=1e-3)
    assert "bad.jpg: not an image" in result.stderr


def test_predict_without_checkpoint(tmp_path: Path) -> None:
    result = run("predict", "x.jpg", "--checkpoint", str(tmp_path / "none"))
    assert_one_line_error(result, "checkpoint not found")


def test_head_change_advises_retraining_when_the_classes_kept_lose_more_than_a_point() -> None:
    from pipeline.cli import kept_classes_advice

    assert kept_classes_advice(0.9401, 0.9338) is None  # -0.6 pp
    assert kept_classes_advice(0.95, 0.96) is None
    advice = kept_classes_advice(0.9401, 0.9117)
    assert advice is not None and "2.8 pp" in advice and "trashsort train" in advice


def test_head_change_advises_more_photos_when_a_new_class_is_rarely_found() -> None:
    from pipeline.cli import new_class_advice

    assert new_class_advice("metal", 0.758, 285) is None
    advice = new_class_advice("metal", 0.29, 20)
    assert advice is not None and advice.startswith("metal is found in 29 % ") and "20 training photos" in advice
