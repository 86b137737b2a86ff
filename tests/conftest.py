"""Shared fixtures: tiny generated datasets and weights, so the suite runs in seconds on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"cardboard": (170, 120, 60), "glass": (60, 160, 90), "metal": (140, 140, 150)}


def make_photo(rng: np.random.Generator, colour: tuple[int, int, int], size=(48, 40)) -> Image.Image:
    """An object-like blob of the class colour on a light backdrop, with noise."""
    w, h = size
    pixels = np.full((h, w, 3), 235, np.float64)
    cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
    r = rng.integers(min(w, h) // 4, min(w, h) // 2)
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    pixels[mask] = colour
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(root: Path, per_class: int = 12, classes=None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes or COLOURS:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_photo(rng, COLOURS.get(name, (200, 30, 30))).save(folder / f"{name}{i}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own decode cache and no ambient weights folder; the Hub is off."""
    monkeypatch.setenv("TRASHSORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TRASHSORT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def imagenet_like_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1000-class state dict of the default preset, as the ../shared weights files are laid out."""
    import timm
    import torch

    import pipeline  # noqa: F401  (torchvision fix before timm)

    torch.manual_seed(0)
    model = timm.create_model("tf_mobilenetv3_small_100", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "tf_mobilenetv3_small_100.in1k-test.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A trained tiny run (resnet10t, 32 px, a few seconds) and its full bundle (all six artefacts),
    shared by the export, edge and head tests."""
    from pipeline import bundle, train

    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRASHSORT_CACHE", str(root / "cache"))
        data = write_dataset(root / "data", per_class=24)
        cfg = train.TrainConfig(data=str(data), model="resnet10t", pretrained=False, size=32, epochs=4,
                                batch_size=8, lr=3e-3, warmup_epochs=0.5, ema_decay=0, threads=2,
                                out_dir=str(root / "runs"), run_name="tiny")
        run = train.train(cfg, progress=False)
        result = bundle.export_run(run.run_dir, calibration_count=24, golden_count=6,
                                   out_dir=root / "dist", progress=False)
        yield {"root": root, "run": run, "result": result, "cache": root / "cache"}
