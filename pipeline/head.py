"""Head retraining: add, retrain, remove or rename classes with the backbone frozen.

Only the classifier head (one linear layer) changes; every other weight and batch-norm statistic
is the fine-tuned backbone's, byte for byte, and its sha256 is checked before and after. The
backbone's pooled embeddings of every photo are cached on disk, keyed by the photo's content hash
under a file named by the backbone's sha256 and the preprocessing, so adding a class embeds only
the new photos and a different backbone never reads another's vectors. The head is a class-balanced
multinomial logistic regression fitted in seconds (L-BFGS), starting from the fine-tuned head's rows
for the classes the model already knows and keeping them close to those.

A head run is an ordinary run folder (``checkpoint.pt``, ``manifest.json`` with a new version and a
history entry, ``config.json``) plus ``classes.json``: where each class's photos come from, so the
next change starts from the right data. Export goes through ``pipeline.bundle`` as usual.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.bundle import read_manifest, sha256_file
from edge.sources import IMAGE_SUFFIXES
from pipeline import data as data_mod
from pipeline.evaluate import compute_metrics
from pipeline.manifest import ClassInfo, Manifest, Preprocess, write_bytes_atomic, write_json_atomic
from pipeline.model import ContractModel, backbone_sha256
from pipeline.train import TrainConfig, load_checkpoint, load_run_config, save_checkpoint

log = logging.getLogger(__name__)

MIN_PHOTOS = 10  # per new class; fewer gives a head that has seen the class only by chance
L2 = 1e-3  # on the weights of a new class's row
ANCHOR = 1e-3  # pull of a known class's row toward its fine-tuned weights (fixed defaults, not tuned on val)


class HeadError(ValueError):
    """A head change that cannot be made as asked; the message says why and what to do."""


@dataclass
class ClassSource:
    """Where one class's photos are: a folder, and the dataset whose splits.csv splits it (if any)."""

    name: str
    folder: str
    dataset: str | None = None


@dataclass
class Source:
    """What a head change starts from: a run (checkpoint + manifest + config) and its classes' data."""

    run_dir: Path
    model: ContractModel
    manifest: Manifest
    cfg: TrainConfig
    classes: list[ClassSource]
    formats: list[str] | None = None  # the artefact keys of the bundle it came from, if any
    bundle: Path | None = None  # that bundle


@dataclass
class HeadResult:
    run_dir: Path
    model: ContractModel
    manifest: Manifest
    folder: data_mod.ImageFolder
    report: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ where a change starts from

def load_source(path: str | Path) -> Source:
    """A run folder (or its checkpoint.pt), or a bundle exported from one (its manifest names it)."""
    path = Path(path)
    formats = bundle = None
    bundle_manifest = None
    if path.is_dir() and not (path / "checkpoint.pt").is_file() and (path / "manifest.json").is_file():
        bundle_manifest = Manifest.from_dict(read_manifest(path), f"{path}/manifest.json")
        checkpoint = bundle_manifest.model.checkpoint
        if not checkpoint or not Path(checkpoint).is_file():
            raise HeadError(f"{path}: the run this bundle was exported from ({checkpoint}) is not on this "
                            "machine; pass --from RUN_FOLDER (the PyTorch weights are needed to re-export)")
        formats = [f"{a['format']}-{a['precision']}" for a in bundle_manifest.artefacts]
        bundle, path = path, Path(checkpoint)
    run_dir, cfg = load_run_config(path)
    model, manifest = load_checkpoint(run_dir)
    if bundle_manifest is not None:
        if bundle_manifest.model.checkpoint_sha256 != manifest.model.checkpoint_sha256:
            raise HeadError(f"{run_dir}: its weights are not the ones the bundle was exported from")
        manifest.classes = bundle_manifest.classes  # names/streams as the bundle has them (renames)
        manifest.version = max(manifest.version, bundle_manifest.version)
    return Source(run_dir, model, manifest, cfg, _class_sources(run_dir, cfg, manifest), formats, bundle)


def load_class_sources(run_dir: Path) -> list[ClassSource]:
    """A head run's ``classes.json``: where each class's photos are, in manifest order."""
    return [ClassSource(**c) for c in json.loads((Path(run_dir) / "classes.json").read_text(encoding="utf-8"))]


def _class_sources(run_dir: Path, cfg: TrainConfig, manifest: Manifest) -> list[ClassSource]:
    if (run_dir / "classes.json").is_file():
        sources = load_class_sources(run_dir)
    else:  # a training run: its class folders, in the (sorted) order they were trained in
        folder = data_mod.scan_folder(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        sources = [ClassSource(c, str((folder.root / c).resolve()), str(folder.root.resolve()))
                   for c in folder.classes]
    if len(sources) != manifest.num_classes:
        raise HeadError(f"{run_dir}: {len(sources)} class sources for {manifest.num_classes} classes")
    for src, cls in zip(sources, manifest.classes):
        src.name = cls.name
    return sources


def class_folder(sources: list[ClassSource], cfg: TrainConfig) -> data_mod.ImageFolder:
    """The photos of every class, in manifest order, split as in training (splits.csv, else seeded)."""
    scanned: dict[str, data_mod.ImageFolder] = {}
    samples: list[data_mod.Sample] = []
    for label, src in enumerate(sources):
        folder = Path(src.folder)
        if src.dataset and (Path(src.dataset) / "splits.csv").is_file():
            if src.dataset not in scanned:
                scanned[src.dataset] = data_mod.scan_folder(src.dataset, val_fraction=cfg.val_fraction,
                                                            seed=cfg.seed)
            ds = scanned[src.dataset]
            index = ds.classes.index(folder.name)
            samples += [data_mod.Sample(s.path, label, s.split) for s in ds.samples if s.label == index]
            continue
        files = photo_files(folder)
        split = data_mod.stratified_split({folder.name: files}, cfg.val_fraction, cfg.seed)
        samples += [data_mod.Sample(p, label, split[p]) for p in files]
    return data_mod.ImageFolder(Path(sources[0].dataset or sources[0].folder), [s.name for s in sources],
                                samples, "per class: splits.csv or seeded")


def photo_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise HeadError(f"{folder}: photo folder not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def new_class_folders(images: Path, name: str | None) -> dict[str, Path]:
    """``--images``: a folder of photos (one class, named ``name`` or after the folder) or a folder of
    class folders (several classes at once)."""
    images = Path(images)
    if not images.is_dir():
        raise HeadError(f"{images}: folder not found")
    subfolders = sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders and not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir()):
        if name:
            raise HeadError(f"{images}: holds several class folders; --name is for a single folder of photos")
        return {p.name: p for p in subfolders}
    return {name or images.name: images}


# ------------------------------------------------------------------ embeddings and their cache

class EmbeddingCache:
    """Pooled backbone embeddings by photo content hash, one file per backbone and preprocessing."""

    def __init__(self, backbone: str, preprocess: Preprocess, folder: Path | None = None) -> None:
        folder = folder or data_mod.default_cache_dir() / "embeddings"
        tag = f"{preprocess.size[0]}x{preprocess.size[1]}-{preprocess.crop_pct}-{preprocess.interpolation}"
        self.path = folder / f"{backbone[:16]}-{tag}.npz"
        self.backbone = backbone
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            stored = np.load(self.path, allow_pickle=False)
            if str(stored["backbone"]) != backbone:  # never mix two backbones' vectors
                log.warning("%s: made by another backbone; rebuilding it", self.path)
            else:
                self.vectors = dict(zip(stored["keys"].tolist(), stored["vectors"]))

    def save(self) -> None:
        buf = io.BytesIO()
        keys = sorted(self.vectors)
        np.savez(buf, backbone=np.array(self.backbone), keys=np.array(keys),
                 vectors=np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, 0), np.float32))
        write_bytes_atomic(self.path, buf.getvalue())


@torch.inference_mode()
def embed(model: ContractModel, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled pre-logits features (what the head sees) of uint8 NHWC images."""
    net = model.eval().model
    out = []
    for start in range(0, len(images), batch_size):
        x = model.inputs(torch.from_numpy(np.array(images[start:start + batch_size])))
        out.append(net.forward_head(net.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, net.num_features), np.float32)


def cached_embeddings(model: ContractModel, images: np.ndarray, keys: list[str],
                      cache: EmbeddingCache) -> tuple[np.ndarray, int]:
    """Embeddings of ``images`` (keys: their content hashes), computing only those not cached."""
    missing = [i for i, k in enumerate(keys) if k not in cache.vectors]
    if missing:
        for i, vector in zip(missing, embed(model, images[missing])):
            cache.vectors[keys[i]] = vector
    return np.stack([cache.vectors[k] for k in keys]), len(missing)


def embed_splits(model: ContractModel, backbone: str, preprocess: Preprocess,
                 decoded: dict[str, data_mod.DecodedSplit], cache_dir: Path | None = None,
                 ) -> tuple[dict[str, np.ndarray], int, EmbeddingCache]:
    """Each split's embeddings through the cache (only the missing ones computed, then saved)."""
    cache = EmbeddingCache(backbone, preprocess, (cache_dir / "embeddings") if cache_dir else None)
    feats, computed = {}, 0
    for split, dec in decoded.items():
        keys = [sha256_file(p) for p in dec.paths]
        images = data_mod.center_crops(dec.images, preprocess.size[0])
        feats[split], n = cached_embeddings(model, images, keys, cache)
        computed += n
    if computed:
        cache.save()
    return feats, computed, cache


Splits = dict[str, np.ndarray]


def embed_folder(model: ContractModel, backbone: str, preprocess: Preprocess, folder: data_mod.ImageFolder,
                 cache_dir: Path | None = None, progress: bool = True,
                 ) -> tuple[Splits, Splits, int, EmbeddingCache]:
    """Each split's embeddings and labels, decoding only the photos whose embedding is not cached
    (after an export, just the new class's photos: decoding all of them took most of a change's time)."""
    cache = EmbeddingCache(backbone, preprocess, (cache_dir / "embeddings") if cache_dir else None)
    feats, labels, computed = {}, {}, 0
    for split in ("train", "val"):
        samples = folder.split(split)
        keys = {s.path: sha256_file(s.path) for s in samples}
        missing = [s for s in samples if keys[s.path] not in cache.vectors]
        if missing:  # unreadable photos are skipped (with a warning) and never cached
            dec = data_mod.decode_for(missing, preprocess, cache_dir, f"decode {split}", progress)
            images = data_mod.center_crops(dec.images, preprocess.size[0])
            computed += cached_embeddings(model, images, [keys[Path(p)] for p in dec.paths], cache)[1]
        kept = [s for s in samples if keys[s.path] in cache.vectors]
        feats[split] = (np.stack([cache.vectors[keys[s.path]] for s in kept]) if kept
                        else np.zeros((0, model.model.num_features), np.float32))
        labels[split] = np.array([s.label for s in kept], dtype=np.int64)
    if computed:
        cache.save()
    return feats, labels, computed, cache


def warm_embedding_cache(model: ContractModel, manifest: Manifest,
                         decoded: dict[str, data_mod.DecodedSplit]) -> int:
    """Embed every photo an export decoded, so that the first add-class after the export embeds
    only its new photos (seconds instead of a minute). Returns how many were not cached yet."""
    return embed_splits(model, backbone_sha256(model.model), manifest.preprocess, decoded)[1]


# ------------------------------------------------------------------ the head

def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
             prior: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, anchor: float = ANCHOR,
             l2: float = L2, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced multinomial logistic regression: (weight [K, D], bias [K]) on the embeddings.

    ``prior`` = (weight, bias, rows): the current head, and for each class the row it had there (-1
    for a new class). Those rows start from what fine-tuning learned and are pulled back toward it
    (``anchor``); new rows start at zero with a plain L2. So the classes a model already knew keep
    their decision rules, and a new class is fitted around them.
    """
    x = torch.from_numpy(features).double()
    y = torch.from_numpy(labels).long()
    weights = data_mod.class_weights(labels, num_classes).double()
    w0 = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    b0 = torch.zeros(num_classes, dtype=torch.float64)
    known = torch.zeros(num_classes, dtype=torch.bool)
    if prior is not None:
        prior_w, prior_b, rows = prior
        for i, row in enumerate(rows):
            if row >= 0:
                w0[i], b0[i], known[i] = torch.from_numpy(prior_w[row]).double(), float(prior_b[row]), True
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = anchor * ((w - w0)[known] ** 2).sum() + l2 * (w[~known] ** 2).sum()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, weight=weights) + penalty
        loss.backward()
        return loss

    # One thread: the problem is small (photos x embedding), more threads gain nothing here, and
    # on a busy machine their spin-waits made the fit take 35-60 s instead of half a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach().float(), b.detach().float()


def install_head(model: ContractModel, weight: torch.Tensor, bias: torch.Tensor) -> None:
    net = model.model
    net.reset_classifier(weight.shape[0])
    head = net.get_classifier()
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


# ------------------------------------------------------------------ a head change, end to end

def retrain_head(source: Source, sources: list[ClassSource], manifest: Manifest, out_dir: str | Path = "runs",
                 cache_dir: Path | None = None, min_photos: int = MIN_PHOTOS, progress: bool = True) -> HeadResult:
    """Fit a new head for ``sources`` (the classes of ``manifest``, in order) on the frozen backbone,
    and save it as a new run folder. The report holds val metrics, old-class accuracy before and
    after, the backbone hash before and after, and the time of each phase."""
    timings: dict[str, float] = {}
    last = time.perf_counter()

    def lap(phase: str) -> None:  # a phase's seconds, from the end of the one before
        nonlocal last
        now = time.perf_counter()
        timings[phase], last = now - last, now

    model = source.model
    backbone_before = backbone_sha256(model.model)
    if source.manifest.model.backbone_sha256 not in (None, backbone_before):
        raise HeadError(f"{source.run_dir}: backbone differs from its manifest's backbone_sha256")
    folder = class_folder(sources, source.cfg)
    known = {(s.name, s.folder) for s in source.classes}
    _check_counts(folder, [s for s in sources if (s.name, s.folder) not in known], min_photos)
    pre = manifest.preprocess
    lap("scan")

    feats, labels, computed, cache = embed_folder(model, backbone_before, pre, folder, cache_dir, progress)
    lap("decode_embed")

    head_layer = model.model.get_classifier()
    rows = _source_rows(source, sources)
    prior = (head_layer.weight.detach().numpy(), head_layer.bias.detach().numpy(),
             rows)
    weight, bias = fit_head(feats["train"], labels["train"], manifest.num_classes, prior)
    lap("fit_head")

    val_labels = labels["val"]
    old_k = source.manifest.num_classes
    old_mask = rows[val_labels] >= 0  # val photos of classes the source model already had
    # A linear head on the embeddings is what the model computes after its backbone (eval mode), so
    # val is scored from the embeddings already at hand; the export's gate runs the full model.
    val_feats = torch.from_numpy(feats["val"])
    before = (val_feats[old_mask] @ head_layer.weight.detach().T + head_layer.bias.detach()).argmax(1).numpy()
    old_labels_in_old_order = rows[val_labels[old_mask]]

    new_model = ContractModel(_clone(model.model), pre)
    install_head(new_model, weight, bias)
    backbone_after = backbone_sha256(new_model.model)
    if backbone_after != backbone_before:
        raise HeadError("the backbone changed during head retraining (a bug): refusing to save")
    probs = torch.softmax(val_feats @ weight.T + bias, dim=1).numpy()
    metrics = compute_metrics(val_labels, probs, manifest.class_names)
    after = probs[old_mask].argmax(1)
    report = {
        "classes": manifest.class_names, "val": {k: metrics[k] for k in ("top1", "macro_f1", "count")},
        "new_classes": [name for name, row in zip(manifest.class_names, rows) if row < 0],  # or new photos
        "per_class": metrics["per_class"],
        "old_classes_val_top1": {
            "before": float((before == old_labels_in_old_order).mean()) if old_mask.any() else None,
            "after": float((after == val_labels[old_mask]).mean()) if old_mask.any() else None,
            "count": int(old_mask.sum()), "classes_before": old_k},
        "backbone_sha256": {"before": backbone_before, "after": backbone_after},
        "embeddings": {"computed": computed, "cached": sum(len(f) for f in feats.values()) - computed,
                       "cache": str(cache.path)},
        "photos": folder.counts(),
    }
    manifest.model.backbone_sha256 = backbone_after
    manifest.metrics = {"val": report["val"]}
    run_dir = Path(out_dir) / f"{manifest.name}-v{manifest.version}"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", asdict(source.cfg))
    write_json_atomic(run_dir / "classes.json", [asdict(s) for s in sources])
    save_checkpoint(run_dir / "checkpoint.pt", new_model.model, manifest, run_dir / "manifest.json")
    lap("evaluate_save")
    report["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    write_json_atomic(run_dir / "head_report.json", report)
    return HeadResult(run_dir, new_model, manifest, folder, report)


def _check_counts(folder: data_mod.ImageFolder, new_sources: list[ClassSource], min_photos: int) -> None:
    counts = {name: 0 for name in folder.classes}
    for s in folder.samples:
        counts[folder.classes[s.label]] += 1
    for src in new_sources:
        if counts[src.name] < min_photos:
            raise HeadError(f"{src.folder}: class {src.name!r} has {counts[src.name]} photo(s); at least "
                            f"{min_photos} are needed (more is better: 30+ photos of the object from "
                            "different sides and backgrounds, or lower --min-photos at your own risk)")
        if not any(s.split == "val" and folder.classes[s.label] == src.name for s in folder.samples):
            raise HeadError(f"{src.folder}: class {src.name!r} has no validation photo")


def _source_rows(source: Source, sources: list[ClassSource]) -> np.ndarray:
    """For each class of the change, its row in the source model's head (-1: new, or new photos)."""
    old_index = {(s.name, s.folder): i for i, s in enumerate(source.classes)}
    return np.array([old_index.get((s.name, s.folder), -1) for s in sources], dtype=np.int64)


def _clone(net: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(net).eval()


# ------------------------------------------------------------------ the four changes

def add_classes(source: Source, new: dict[str, Path], streams: dict[str, str | None] | None = None,
                replace: bool = False, **options: Any) -> HeadResult:
    """Append classes (stable ids for the existing ones); ``replace`` swaps an existing class's photos."""
    streams = streams or {}
    manifest = Manifest.from_dict(source.manifest.to_dict())
    sources = [ClassSource(**asdict(s)) for s in source.classes]
    existing = {c.name: i for i, c in enumerate(manifest.classes)}
    for name, folder in new.items():
        if name in existing and not replace:
            raise HeadError(f"class {name!r} already exists (id {existing[name]}): use --replace to retrain it "
                            "on these photos, or --name to add it under another name")
        if not name.strip():
            raise HeadError(f"{folder}: empty class name")
    _warn_duplicates(sources, new)
    added, replaced = [], []
    for name, folder in new.items():
        folder = Path(folder).resolve()
        # A class folder of a dataset with splits.csv keeps that split (e.g. TrashNet's group-aware one).
        dataset = str(folder.parent) if (folder.parent / "splits.csv").is_file() else None
        src = ClassSource(name, str(folder), dataset)
        if name in existing:
            sources[existing[name]] = src
            if streams.get(name) is not None:
                manifest.classes[existing[name]].stream = streams[name]
            replaced.append(name)
        else:
            manifest.classes.append(ClassInfo(len(manifest.classes), name, streams.get(name)))
            sources.append(src)
            added.append(name)
    change = "; ".join(filter(None, [added and f"added {', '.join(added)} (head only)",
                                     replaced and f"replaced the photos of {', '.join(replaced)} (head only)"]))
    manifest.add_history(change)
    return retrain_head(source, sources, manifest, **options)


def retrain_only(source: Source, **options: Any) -> HeadResult:
    manifest = Manifest.from_dict(source.manifest.to_dict())
    manifest.add_history("retrained the head on the current photos (head only)")
    return retrain_head(source, list(source.classes), manifest, **options)


def remove_classes(source: Source, names: list[str], **options: Any) -> HeadResult:
    """Drop classes; the ones after a removed class move up (ids stay 0..N-1 in order)."""
    unknown = [n for n in names if n not in source.manifest.class_names]
    if unknown:
        raise HeadError(f"no class named {', '.join(map(repr, unknown))}: "
                        f"the classes are {', '.join(source.manifest.class_names)}")
    if len(set(names)) >= source.manifest.num_classes - 1:
        raise HeadError("a classifier needs at least two classes left")
    manifest = Manifest.from_dict(source.manifest.to_dict())
    keep = [i for i, c in enumerate(manifest.classes) if c.name not in names]
    manifest.classes = [ClassInfo(j, manifest.classes[i].name, manifest.classes[i].stream)
                        for j, i in enumerate(keep)]
    manifest.add_history(f"removed {', '.join(names)} (head only)")
    return retrain_head(source, [source.classes[i] for i in keep], manifest, **options)


def _warn_duplicates(sources: list[ClassSource], new: dict[str, Path]) -> list[str]:
    """New photos whose bytes are already in the data (another class, or the same one twice)."""
    seen: dict[str, Path] = {}
    for src in sources:
        for p in photo_files(Path(src.folder)):
            seen.setdefault(sha256_file(p), p)
    duplicates = []
    for folder in new.values():
        for p in photo_files(Path(folder)):
            digest = sha256_file(p)
            if digest in seen:
                duplicates.append(f"{p} = {seen[digest]}")
            seen.setdefault(digest, p)
    for line in duplicates[:20]:
        log.warning("duplicate photo: %s", line)
    if duplicates:
        log.warning("%d new photo(s) duplicate photos already in the data (see above)", len(duplicates))
    return duplicates


def rename_class(manifest: Manifest, old: str, new: str) -> Manifest:
    """The same model under a new class name: a manifest change only (no retraining, same artefacts)."""
    if old not in manifest.class_names:
        raise HeadError(f"no class named {old!r}: the classes are {', '.join(manifest.class_names)}")
    if new in manifest.class_names:
        raise HeadError(f"class {new!r} already exists")
    renamed = Manifest.from_dict(manifest.to_dict())
    renamed.classes[renamed.class_names.index(old)].name = new
    renamed.add_history(f"renamed {old} to {new} (manifest only)")
    return renamed


def rename_in_run(run_dir: Path, old: str, new: str) -> Manifest:
    """Rename a class in a run folder's manifest (and classes.json), in place."""
    from pipeline.manifest import load

    manifest = rename_class(load(run_dir / "manifest.json"), old, new)
    if (run_dir / "classes.json").is_file():
        sources = load_class_sources(run_dir)
        for src in sources:
            src.name = new if src.name == old else src.name
        write_json_atomic(run_dir / "classes.json", [asdict(s) for s in sources])
    manifest.save(run_dir / "manifest.json")
    return manifest
