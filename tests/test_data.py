import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.preprocess import (
    ImageDecodeError,
    load_rgb,
    resize_and_crop,
    resize_shorter,
    shorter_side,
    square_for_crop,
)
from pipeline import data
from tests.conftest import make_photo, write_dataset


def test_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", per_class=20)
    a = data.scan_folder(root, val_fraction=0.25, seed=3)
    b = data.scan_folder(root, val_fraction=0.25, seed=3)
    c = data.scan_folder(root, val_fraction=0.25, seed=4)
    assert a.samples == b.samples
    assert [s.split for s in a.samples] != [s.split for s in c.samples]
    assert a.counts()["val"] == {"cardboard": 5, "glass": 5, "metal": 5}
    assert a.counts()["train"] == {"cardboard": 15, "glass": 15, "metal": 15}


def test_splits_csv_decides(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", per_class=4)
    rows = ["path,label,split"]
    for c in ("cardboard", "glass", "metal"):
        rows += [f"{c}/{c}0.jpg,{c},val", f"{c}/{c}1.jpg,{c},train", f"{c}/{c}2.jpg,{c},train"]
    (root / "splits.csv").write_text("\n".join(rows) + "\n")
    folder = data.scan_folder(root)
    assert folder.split_source == "splits.csv"
    assert len(folder.split("val")) == 3 and len(folder.split("train")) == 6
    assert len(folder.ignored) == 3 and all("not listed" in i for i in folder.ignored)


def test_splits_csv_errors(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", per_class=2)
    (root / "splits.csv").write_text("path,label,split\ncardboard/cardboard0.jpg,battery,train\n")
    with pytest.raises(data.DatasetError, match="label 'battery' has no class folder"):
        data.scan_folder(root)
    (root / "splits.csv").write_text("path,label,split\ncardboard/cardboard0.jpg,glass,train\n")
    with pytest.raises(data.DatasetError, match="labelled 'glass' but sits in folder 'cardboard'"):
        data.scan_folder(root)
    (root / "splits.csv").write_text("file,class\n")
    with pytest.raises(data.DatasetError, match="expected columns path,label,split"):
        data.scan_folder(root)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="data folder not found"):
        data.scan_folder(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    with pytest.raises(data.DatasetError, match="no class folders"):
        data.scan_folder(tmp_path / "flat")
    root = write_dataset(tmp_path / "d", per_class=2)
    (root / "paper").mkdir()
    with pytest.raises(data.DatasetError, match="class folder 'paper' is empty"):
        data.scan_folder(root)


def write_bad_files(folder: Path) -> dict[str, str]:
    """One file per kind of broken input, with the phrase its warning must contain."""
    rng = np.random.default_rng(0)
    good = folder / "good.jpg"
    make_photo(rng, (10, 200, 10)).save(good)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    raw = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return {"zero.jpg": "empty file", "notes.jpg": "not an image", "truncated.jpg": "truncated",
            "corrupt.png": "corrupt"}


def test_bad_images_skipped_with_named_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_dataset(tmp_path / "d", per_class=3)
    expected = write_bad_files(root / "glass")
    folder = data.scan_folder(root, all_split="train")
    with caplog.at_level(logging.WARNING):
        decoded = data.decode_split(folder.samples, 16)
    assert len(decoded.labels) == 10  # 9 generated + good.jpg
    assert len(decoded.skipped) == 4
    for name, phrase in expected.items():
        line = next(s for s in decoded.skipped if name in s)
        assert phrase in line, line
        assert name in caplog.text
    report = data.data_report(folder, {"train": decoded})
    assert report["skipped_count"] == 4


@pytest.mark.parametrize("kind", ["zero.jpg", "notes.jpg", "truncated.jpg", "corrupt.png"])
def test_load_rgb_raises_naming_file(tmp_path: Path, kind: str) -> None:
    write_bad_files(tmp_path)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(tmp_path / kind)
    assert str(tmp_path / kind) in str(err.value)


def test_modes_become_rgb(tmp_path: Path) -> None:
    grey = np.linspace(0, 255, 24 * 16).reshape(16, 24).astype(np.uint8)
    cases = {
        "L.png": Image.fromarray(grey, "L"),
        "P.png": Image.fromarray(grey, "L").convert("P"),
        "LA.png": Image.merge("LA", [Image.fromarray(grey), Image.new("L", (24, 16), 255)]),
        "RGBA.png": Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), "RGBA"),
        "CMYK.jpg": Image.fromarray(np.dstack([grey] * 3), "RGB").convert("CMYK"),
        "I16.png": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    assert cases["I16.png"].mode.startswith("I;16")
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (24, 16), name
        arr = np.asarray(out)
        # 16-bit must be scaled down, not clipped to white: the gradient survives.
        assert arr[..., 0].min() < 30 and arr[..., 0].max() > 220, name


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (np.asarray(load_rgb(tmp_path / "t.png")) == 255).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_cached_square_crops_to_the_contract_for_any_shape() -> None:
    """The cache's square, center-cropped, is the edge runner's direct crop for every photo shape and
    crop size (a plain center square is a pixel off for some: two roundings)."""
    rng = np.random.default_rng(0)
    for crop in (224, 32, 33):
        side = shorter_side([crop, crop], 0.875)
        for w, h in [(512, 384), (384, 512), (300, 300), (1000, 250), (47, 46), (46, 47), (61, 40), (40, 63)]:
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            direct = resize_and_crop(img, (crop, crop), side)
            assert direct.shape == (crop, crop, 3) and direct.dtype == np.uint8
            square = np.asarray(square_for_crop(resize_shorter(img, side), side, crop))
            assert square.shape == (side, side, 3)
            assert np.array_equal(data.center_crops(square[None], crop)[0], direct), (crop, w, h)


def test_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(tmp_path / "d", per_class=2)
    folder = data.scan_folder(root, all_split="train")
    first = data.decode_split(folder.samples, 16)
    calls = []
    monkeypatch.setattr(data, "load_rgb", lambda p: calls.append(p))
    again = data.decode_split(folder.samples, 16)
    assert calls == [] and np.array_equal(first.images, again.images)
    monkeypatch.undo()
    make_photo(np.random.default_rng(9), (0, 0, 0)).save(folder.samples[0].path)  # photo changed
    changed = data.decode_split(folder.samples, 16)
    assert not np.array_equal(first.images[0], changed.images[0])


def test_augment_is_seeded() -> None:
    import torch

    images = np.random.default_rng(0).integers(0, 255, (4, 20, 20, 3), dtype=np.uint8)
    aug = data.Augment(size=12)
    a = aug(images, torch.Generator().manual_seed(1))
    b = aug(images, torch.Generator().manual_seed(1))
    c = aug(images, torch.Generator().manual_seed(2))
    assert a.shape == (4, 3, 12, 12) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_trivial_augment_is_seeded_per_photo_and_leaves_torch_rng_alone() -> None:
    import torch

    images = np.random.default_rng(0).integers(0, 255, (8, 20, 20, 3), dtype=np.uint8)
    plain = data.Augment(size=16, hflip=False, vflip=False, rotate90=False, jitter=0.0)
    trivial = data.Augment(size=16, hflip=False, vflip=False, rotate90=False, jitter=0.0,
                           trivial_augment=True)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = trivial(images, torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), before)  # torch's global generator as it was
    assert torch.equal(a, trivial(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, trivial(images, torch.Generator().manual_seed(2)))
    assert a.shape == (8, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    # Same crops (the generator's draws before the ops are the same), then one op per photo:
    # photos differ from the plain crop in different ways, and at least one is changed.
    base = plain(images, torch.Generator().manual_seed(1))
    changed = [not torch.allclose(x, y, atol=1e-6) for x, y in zip(a, base)]
    assert any(changed)
    assert len({round(float((x - y).abs().mean()), 6) for x, y in zip(a, base)}) > 1


def test_mix_batch_mixup_cutmix_and_off() -> None:
    import torch

    # Four flat photos of different greys: every pixel says which photo it came from.
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16) / 4
    same, partner, lam = data.mix_batch(x, torch.Generator().manual_seed(0))
    assert same is x and lam == 1.0 and torch.equal(partner, torch.arange(4))

    mixed, partner, lam = data.mix_batch(x, torch.Generator().manual_seed(0), mixup=0.4)
    assert 0 < lam < 1 and sorted(partner.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[partner])
    again, _, lam_again = data.mix_batch(x, torch.Generator().manual_seed(0), mixup=0.4)
    assert torch.equal(mixed, again) and lam == lam_again  # seeded by the generator alone

    for seed in range(5):
        cut, partner, lam = data.mix_batch(x, torch.Generator().manual_seed(seed), cutmix=1.0)
        own = cut == x
        pasted = cut == x[partner]
        assert bool((own | pasted).all())  # every pixel from the photo or from its partner
        moved = partner != torch.arange(4)
        if moved.any():  # the pasted box covers exactly 1 - lam of each photo that has a partner
            share = (~own[moved]).float().mean().item()
            assert share == pytest.approx(1 - lam, abs=1e-6)


def test_class_weights_balance_rare_classes() -> None:
    w = data.class_weights(np.array([0] * 90 + [1] * 10), 2)
    assert w[1] / w[0] == pytest.approx(9.0)
    assert w.mean().item() == pytest.approx(1.0)


def test_hub_dedupe_drops_resized_copies() -> None:
    rng = np.random.default_rng(1)
    photos = [make_photo(rng, (200, 100, 0), size=(128, 96)) for _ in range(3)]
    items = [(p, "metal") for p in photos] + [(p.resize((64, 48)), "metal") for p in photos]
    kept = data.dedupe_images(items)
    assert len(kept) == 3 and all(img.size == (128, 96) for img, _ in kept)
