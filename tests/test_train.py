import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import manifest as manifest_mod
from pipeline import train as train_mod


def tiny_config(data: Path, out: Path, **overrides) -> train_mod.TrainConfig:
    values = dict(data=str(data), model="resnet10t", pretrained=False, size=32, epochs=3, batch_size=8, lr=3e-3,
                  warmup_epochs=0.5, ema_decay=0.9, threads=1, out_dir=str(out), run_name="tiny",
                  patience=50)
    values.update(overrides)
    return train_mod.TrainConfig(**values)


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [train_mod.lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.01


def test_tiny_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    result = train_mod.train(tiny_config(tiny_data, tmp_path / "runs"), progress=False)
    run = result.run_dir
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "last.pt", "manifest.json",
                 "data_report.json", "metrics.json", "confusion.csv", "confusion.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    manifest = manifest_mod.load(run / "manifest.json")
    assert manifest.class_names == ["cardboard", "glass", "metal"]
    assert manifest.preprocess.size == [32, 32]
    assert manifest.model.arch == "resnet10t" and manifest.model.weights_source == "none"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["top1"] == manifest.metrics["val"]["top1"] == max(r["val_top1"] for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns, even from random weights
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped_count"] == 0 and sum(report["counts"]["val"].values()) == 6
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    model, _ = train_mod.load_checkpoint(run)
    assert model(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 3)


@pytest.mark.parametrize("variant", ["mixing", "imagenet_distill"])
def test_training_is_reproducible_and_survives_a_kill(variant: str, tiny_data: Path, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """Kill a run mid-epoch with SIGKILL, resume it: it ends with the same weights as a clean run
    (with mixup, CutMix and TrivialAugment on, whose draws are seeded too, and two optimizer
    parameter groups; or
    with the ImageNet distillation term, whose own head must be resumed too)."""
    if variant == "mixing":
        options = dict(mixup=0.2, cutmix=1.0, trivial_augment=True, backbone_lr_scale=0.5)
    else:
        weights = request.getfixturevalue("peaked_imagenet_weights")
        options = dict(model="mobilenetv3_small", pretrained=True, weights=str(weights), imagenet_distill=1.0)
    clean = train_mod.train(tiny_config(tiny_data, tmp_path / "a", **options), progress=False)

    cfg = tiny_config(tiny_data, tmp_path / "b", **options)
    steps_per_epoch = 4  # 30 train photos / batch 8
    script = (
        "import sys; from pipeline import train as t; "
        "t.train(t.TrainConfig(**__import__('json').loads(sys.argv[1])), progress=False)"
    )
    env = {**os.environ, train_mod.KILL_AT_STEP_ENV: str(steps_per_epoch + 2)}  # inside epoch 2
    from dataclasses import asdict

    proc = subprocess.run([sys.executable, "-c", script, json.dumps(asdict(cfg))], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = Path(cfg.out_dir) / "tiny"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # only epoch 1 finished
    assert not (run / "metrics.json").exists()

    resumed = train_mod.resume(run, progress=False)
    a = torch.load(clean.checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.checkpoint, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the best checkpoint may be epoch 1's (before the kill): the last weights must match too
    a = torch.load(clean.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["top1"] == clean.metrics["top1"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.fixture
def peaked_imagenet_weights(imagenet_like_weights: Path, tmp_path: Path) -> Path:
    """The random "ImageNet" weights give near-uniform predictions, which leave the distillation
    term nothing to keep: a larger classifier makes them peaked, as real ImageNet predictions are."""
    state = torch.load(imagenet_like_weights, weights_only=True)
    state["classifier.weight"] = state["classifier.weight"] * 300
    path = tmp_path / "weights" / imagenet_like_weights.name
    path.parent.mkdir()
    torch.save(state, path)
    return path


def test_imagenet_distill_pulls_toward_the_pretrained_predictions(peaked_imagenet_weights: Path) -> None:
    from pipeline.model import create_model, imagenet_model

    model, _ = create_model("mobilenetv3_small", 3, weights=peaked_imagenet_weights)
    distill = train_mod.ImagenetDistill(model, imagenet_model("mobilenetv3_small", peaked_imagenet_weights))
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    model(x)
    assert distill.loss(x).item() < 1e-6  # the pretrained backbone: the pretrained ImageNet predictions
    with torch.no_grad():
        model.conv_stem.weight.mul_(1.5)  # fine-tuning moved the features
    model(x)
    loss = distill.loss(x)
    assert loss.item() > 1e-4
    loss.backward()
    assert model.conv_stem.weight.grad.abs().sum() > 0  # it pulls the backbone back
    assert distill.head.weight.grad.abs().sum() > 0
    assert model.get_classifier().weight.grad is None  # not the new classes' head
    assert all(p.grad is None for p in distill.teacher.parameters())


def test_imagenet_distill_needs_pretrained_weights(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the pretrained ImageNet model"):
        train_mod.train(tiny_config(tiny_data, tmp_path / "runs", imagenet_distill=1.0), progress=False)


def test_backbone_lr_scale_slows_only_the_pretrained_layers(tiny_data: Path, tmp_path: Path) -> None:
    """With a near-zero scale the backbone's weights stay where they started; the classifier moves."""
    from pipeline.model import create_model

    result = train_mod.train(tiny_config(tiny_data, tmp_path / "runs", epochs=1, backbone_lr_scale=1e-9),
                             progress=False)
    trained = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    torch.manual_seed(0)  # the seed train() draws the initial weights with
    start, _ = create_model("resnet10t", len(result.manifest.classes), pretrained=False)
    params = dict(start.named_parameters())
    assert params.keys() <= trained.keys()
    moved = {name for name, p in params.items() if not torch.allclose(trained[name], p, atol=1e-6)}
    assert moved == {"fc.weight", "fc.bias"}

    groups = train_mod.param_groups(start, 1e-3, 0.1)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert {id(p) for p in groups[0]["params"]} == {id(params["fc.weight"]), id(params["fc.bias"])}


def test_existing_run_is_not_overwritten(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "runs", epochs=1)
    train_mod.train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="resume it with --resume"):
        train_mod.train(cfg, progress=False)


def test_early_stopping(tiny_data: Path, tmp_path: Path) -> None:
    result = train_mod.train(tiny_config(tiny_data, tmp_path / "runs", epochs=30, patience=1, lr=1e-9),
                             progress=False)
    records = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(records) < 30
