"""Data: find photos in class folders, split them, decode once into a cache, augment batches.

Sources:
- an image folder with one sub-folder per class, and optionally ``splits.csv`` (``path,label,split``);
  without it, a deterministic stratified split from a seed;
- the Hub dataset ``garythung/trashnet`` (when the Hub is reachable), written out as such a folder.

Decoding 512x384 JPEGs every epoch would dominate training on 2 cores, so each photo is decoded
once (Pillow, EXIF orientation, any mode to RGB), resized and center-cropped to a square of side
``round(size / crop_pct)`` and kept in a uint8 array cached on disk. Evaluation takes the center
``size`` crop of that square, which is exactly the input contract in ``edge/preprocess.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge.preprocess import ImageDecodeError, load_rgb, resize_shorter, square_for_crop
from pipeline.manifest import Preprocess, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_FORMAT = 2  # bump when the cached pixels would change for the same inputs
HUB_DATASET = "garythung/trashnet"


class DatasetError(ValueError):
    """A data folder that cannot be used, with the folder and the problem named."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    split: str


@dataclass
class ImageFolder:
    """The photos of a class-folder dataset with their labels and splits."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    split_source: str
    ignored: list[str] = field(default_factory=list)  # files not used, each with the reason

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Photos per split and class, for the data report."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            per_class = out.setdefault(s.split, {c: 0 for c in self.classes})
            per_class[self.classes[s.label]] += 1
        return out


def scan_folder(
    root: str | Path, *, val_fraction: float = 0.15, seed: int = 0, use_splits_csv: bool = True,
    all_split: str | None = None,
) -> ImageFolder:
    """Index a class-folder dataset.

    ``splits.csv`` in ``root`` decides the splits when present (and ``use_splits_csv``); otherwise
    each class is split deterministically from ``seed``. ``all_split`` puts every photo in one
    split (e.g. a held-out test folder scored as a whole).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{root}: no class folders (expected one sub-folder of photos per class)")
    classes = [p.name for p in class_dirs]
    files: dict[str, list[Path]] = {}
    for d in class_dirs:
        found = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not found:
            raise DatasetError(f"{d}: class folder {d.name!r} is empty")
        files[d.name] = found

    csv_path = root / "splits.csv"
    if all_split is not None:
        samples = [Sample(p, classes.index(c), all_split) for c in classes for p in files[c]]
        return ImageFolder(root, classes, samples, f"all:{all_split}")
    if use_splits_csv and csv_path.is_file():
        return _from_splits_csv(root, csv_path, classes, files)
    split_of = stratified_split({c: files[c] for c in classes}, val_fraction, seed)
    samples = [Sample(p, classes.index(c), split_of[p]) for c in classes for p in files[c]]
    return ImageFolder(root, classes, samples, f"stratified val_fraction={val_fraction} seed={seed}")


def _from_splits_csv(
    root: Path, csv_path: Path, classes: list[str], files: dict[str, list[Path]]
) -> ImageFolder:
    listed: dict[Path, tuple[str, str]] = {}
    problems: list[str] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
            raise DatasetError(f"{csv_path}: expected columns path,label,split, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            path = (root / row["path"]).resolve()
            if row["label"] not in classes:
                problems.append(f"line {line}: label {row['label']!r} has no class folder")
            elif row["split"] not in SPLITS:
                problems.append(f"line {line}: split {row['split']!r} is not one of {list(SPLITS)}")
            else:
                listed[path] = (row["label"], row["split"])
    if problems:
        raise DatasetError(f"{csv_path}: " + "; ".join(problems[:10]))
    samples: list[Sample] = []
    ignored: list[str] = []
    for c in classes:
        for p in files[c]:
            entry = listed.pop(p.resolve(), None)
            if entry is None:
                ignored.append(f"{p}: not listed in splits.csv")
            elif entry[0] != c:
                raise DatasetError(f"{csv_path}: {p} is labelled {entry[0]!r} but sits in folder {c!r}")
            else:
                samples.append(Sample(p, classes.index(c), entry[1]))
    ignored += [f"{p}: listed in splits.csv but missing" for p in listed]
    for line in ignored[:20]:
        log.warning("ignored %s", line)
    return ImageFolder(root, classes, samples, "splits.csv", ignored)


def stratified_split(files_by_class: dict[str, list[Path]], val_fraction: float, seed: int) -> dict[Path, str]:
    """Per class, a seeded shuffle of the sorted files; the first ``val_fraction`` go to val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    split: dict[Path, str] = {}
    for c in sorted(files_by_class):
        paths = sorted(files_by_class[c])
        # A string seed hashes the same in every process (unlike hash()), so splits are stable.
        random.Random(f"{seed}:{c}").shuffle(paths)
        n_val = round(len(paths) * val_fraction) if len(paths) > 1 else 0
        n_val = max(n_val, 1) if len(paths) > 1 else 0
        for i, p in enumerate(paths):
            split[p] = "val" if i < n_val else "train"
    return split


# ---------------------------------------------------------------- decode cache


@dataclass
class DecodedSplit:
    """Photos of one split decoded to uint8 squares (N, S, S, 3), with what was skipped."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    skipped: list[str]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRASHSORT_CACHE", Path.home() / ".cache" / "trashsort"))


def decode_split(
    samples: Sequence[Sample], side: int, interpolation: str = "bilinear", crop: int | None = None,
    cache_dir: Path | None = None, desc: str = "decode", workers: int | None = None, progress: bool = True,
) -> DecodedSplit:
    """Decode photos once into ``side x side`` squares; reuse the on-disk cache when it matches.

    The square is placed so that its center ``crop`` is the contract's center crop of the photo
    (``center_crops`` then gives the edge runner's input tensor byte for byte).

    Unreadable files are skipped with a warning naming each one; they never reach training.
    """
    cache_dir = cache_dir or default_cache_dir()
    crop = crop or side
    key = _cache_key(samples, side, interpolation, crop)
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if array_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return DecodedSplit(np.load(array_path), np.array(meta["labels"], dtype=np.int64),
                            meta["paths"], meta["skipped"])

    def decode(sample: Sample) -> np.ndarray | str:
        try:
            img = resize_shorter(load_rgb(sample.path), side, interpolation)
            return np.asarray(square_for_crop(img, side, crop), dtype=np.uint8)
        except ImageDecodeError as e:
            return str(e)

    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        results = list(tqdm(pool.map(decode, samples), total=len(samples), desc=desc, unit="img",
                            leave=False, disable=not progress or len(samples) < 50))
    kept = [(s, r) for s, r in zip(samples, results) if isinstance(r, np.ndarray)]
    skipped = [r for r in results if isinstance(r, str)]
    for reason in skipped:
        log.warning("skipped %s", reason)
    images = np.stack([r for _, r in kept]) if kept else np.zeros((0, side, side, 3), np.uint8)
    decoded = DecodedSplit(images, np.array([s.label for s, _ in kept], dtype=np.int64),
                           [str(s.path) for s, _ in kept], skipped)
    buf = _npy_bytes(images)
    write_bytes_atomic(array_path, buf)
    write_json_atomic(meta_path, {"labels": decoded.labels.tolist(), "paths": decoded.paths,
                                  "skipped": skipped})
    return decoded


def decode_for(samples: Sequence[Sample], preprocess: Preprocess, cache_dir: Path | None = None,
               desc: str = "decode", progress: bool = True) -> DecodedSplit:
    """``decode_split`` with the resize, interpolation and crop of a model's preprocessing."""
    return decode_split(samples, preprocess.resize_shorter_to, preprocess.interpolation, preprocess.size[0],
                        cache_dir=cache_dir, desc=desc, progress=progress)


def decode_splits(folder: ImageFolder, preprocess: Preprocess, cache_dir: Path | None = None,
                  progress: bool = True) -> dict[str, DecodedSplit]:
    """``train`` and ``val`` of a folder, decoded (through the cache) for a model's preprocessing."""
    return {split: decode_for(folder.split(split), preprocess, cache_dir, f"decode {split}", progress)
            for split in ("train", "val")}


def _cache_key(samples: Sequence[Sample], side: int, interpolation: str, crop: int) -> str:
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{side}|{interpolation}|{crop}".encode())
    for s in samples:
        st = s.path.stat()
        h.update(f"|{s.path.resolve()}|{s.label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def center_crops(images: np.ndarray, size: int) -> np.ndarray:
    """The contract's center crop of cached squares (same rounding as edge.preprocess)."""
    side = images.shape[1]
    top = int(round((side - size) / 2.0))
    return images[:, top:top + size, top:top + size]


# ---------------------------------------------------------------- augmentation


@dataclass
class Augment:
    """Batch augmentation on uint8 squares, on the CPU, driven by one seeded generator."""

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True  # an object on a backdrop has no fixed "up"
    rotate90: bool = True
    jitter: float = 0.3  # brightness/contrast/saturation strength
    # TrivialAugment (Mueller & Hutter, 2021): one op of 14 (shear, rotate, posterize, equalize, ...)
    # at a random strength per photo, no knobs to tune; it replaces the colour jitter, as timm's
    # auto-augment does.
    trivial_augment: bool = False

    def __call__(self, images: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float (N, 3, size, size) in [0, 1]."""
        out = torch.empty(len(images), 3, self.size, self.size)
        for i, img in enumerate(images):
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
            top, left, h, w = self._crop_box(x.shape[1], x.shape[2], gen)
            crop = x[:, top:top + h, left:left + w].unsqueeze(0)
            out[i] = F.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                   align_corners=False, antialias=True)[0]
        flips = torch.rand(len(images), 3, generator=gen)
        if self.hflip:
            out[flips[:, 0] < 0.5] = out[flips[:, 0] < 0.5].flip(3)
        if self.vflip:
            out[flips[:, 1] < 0.5] = out[flips[:, 1] < 0.5].flip(2)
        if self.rotate90:
            out[flips[:, 2] < 0.5] = out[flips[:, 2] < 0.5].transpose(2, 3)
        if self.trivial_augment:
            out = self._trivial_augment(out, gen)
        elif self.jitter > 0:
            out = self._color_jitter(out, gen)
        return out.clamp_(0, 1)

    @staticmethod
    def _trivial_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from torchvision.transforms import v2  # pipeline/__init__ made it importable

        # torchvision draws from torch's global generator: seed it from ours, then restore it.
        seed = int(torch.randint(2**31, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            augment = v2.TrivialAugmentWide()
            return torch.stack([augment(img) for img in x])

    def _crop_box(self, height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale, generator=gen).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(),
                                                       generator=gen)).item()
            w = int(round((target * aspect) ** 0.5))
            h = int(round((target / aspect) ** 0.5))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        return 0, 0, height, width

    def _color_jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(x)
        factors = 1 + (torch.rand(n, 3, generator=gen) * 2 - 1) * self.jitter
        b, c, s = (factors[:, i].view(n, 1, 1, 1) for i in range(3))
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        return (x - grey) * s + grey


def mix_batch(x: torch.Tensor, gen: torch.Generator, mixup: float = 0.0,
              cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix on an augmented float batch: each photo is blended with (mixup) or has a
    box pasted from (CutMix) its partner ``x[partner]``. Returns the mixed batch, ``partner`` and
    ``lam``, the share of each photo's own label (loss = lam * CE(y) + (1 - lam) * CE(y[partner])).
    ``mixup``/``cutmix`` are Beta(alpha, alpha) parameters, 0 = off; with both on, one of the two is
    drawn per batch (timm's convention). Off: the batch unchanged, lam 1."""
    n = len(x)
    if mixup <= 0 and cutmix <= 0:
        return x, torch.arange(n), 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    # Beta draws from a numpy generator seeded by ours, so the run stays seeded by (seed, epoch).
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(alpha, alpha))
    partner = torch.randperm(n, generator=gen)
    if not use_cutmix:
        return x * lam + x[partner] * (1 - lam), partner, lam
    height, width = x.shape[2], x.shape[3]
    cut = (1 - lam) ** 0.5  # the box covers 1 - lam of the area, clipped at the borders
    cy, cx = (int(torch.randint(0, d, (1,), generator=gen)) for d in (height, width))
    top, bottom = max(cy - int(height * cut / 2), 0), min(cy + int(height * cut / 2), height)
    left, right = max(cx - int(width * cut / 2), 0), min(cx + int(width * cut / 2), width)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    return mixed, partner, 1 - (bottom - top) * (right - left) / (height * width)


def to_float_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1: a rare class (trash is 5 %) counts as much as a common one."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def data_report(folder: ImageFolder, decoded: dict[str, DecodedSplit]) -> dict:
    """What the run trained on: counts per split and class, and every file skipped or ignored."""
    skipped = [reason for d in decoded.values() for reason in d.skipped]
    return {
        "root": str(folder.root),
        "classes": folder.classes,
        "split_source": folder.split_source,
        "counts": {name: dict(Counter(folder.classes[i] for i in d.labels)) for name, d in decoded.items()},
        "skipped_count": len(skipped),
        "skipped": skipped,
        "ignored_count": len(folder.ignored),
        "ignored": folder.ignored,
    }


# ---------------------------------------------------------------- Hub source


def image_fingerprint(img) -> bytes:
    """A 64-bit average hash: the same photo at two resolutions gives the same fingerprint.

    Box-averaging to 8x8 washes out resampling differences; each bit says "brighter than the mean".
    """
    small = np.asarray(img.convert("L").resize((8, 8), resample=4), dtype=np.float64)  # 4 = BOX
    return np.packbits((small > small.mean()).ravel()).tobytes()


def dedupe_images(items: Sequence[tuple[object, str]]) -> list[tuple[object, str]]:
    """Keep the first (largest) of each group of photos with the same fingerprint and label."""
    ordered = sorted(items, key=lambda it: -(it[0].size[0] * it[0].size[1]))  # type: ignore[attr-defined]
    seen: set[tuple[bytes, str]] = set()
    kept = []
    for img, label in ordered:
        key = (image_fingerprint(img), label)
        if key not in seen:
            seen.add(key)
            kept.append((img, label))
    return kept


def download_hub_trashnet(dest: str | Path, repo_id: str = HUB_DATASET) -> Path:
    """Write the Hub copy of TrashNet as class folders under ``dest`` (needs the Hub and ``datasets``).

    That copy holds every photo twice (original and resized), so a random split of it leaks val
    photos into training: near-duplicates are dropped by fingerprint before anything is split.
    """
    try:
        from datasets import load_dataset  # optional: only this source needs it
    except ImportError:
        raise DatasetError("the Hub source needs the 'datasets' package: pip install datasets") from None
    ds = load_dataset(repo_id, split="train")
    names = ds.features["label"].names
    kept = dedupe_images([(row["image"], names[row["label"]]) for row in ds])
    dest = Path(dest)
    for i, (img, label) in enumerate(tqdm(kept, desc="write hub photos")):
        out = dest / label / f"{label}{i}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(out, quality=95)
    return dest
