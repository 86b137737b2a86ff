"""Fine-tuning: AdamW, warm-up + cosine, label smoothing, augmentation, EMA, class balancing,
early stopping on val, best checkpoint kept, resumable, seeded.

Each run lives in ``runs/<id>/``: ``config.json``, ``metrics.jsonl`` (one line per epoch),
``checkpoint.pt`` (best weights), ``last.pt`` (everything needed to resume), ``manifest.json``,
``data_report.json`` and, at the end, ``metrics.json`` + confusion matrix for the best weights.

Reproducibility: every random draw of epoch ``e`` comes from generators seeded with
``(seed, e)``, and ``last.pt`` is written at each epoch end, so a run killed mid-epoch and resumed
ends with the same weights as one never interrupted (same machine, same thread count).
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from tqdm import tqdm

from pipeline import data as data_mod
from pipeline.evaluate import compute_metrics, format_summary, predict_probs, write_report
from pipeline.manifest import (
    Manifest,
    ManifestError,
    new_manifest,
    write_bytes_atomic,
    write_json_atomic,
)
from pipeline.model import (
    DEFAULT_PRESET,
    ContractModel,
    Normalize,
    backbone_sha256,
    classifier_prefix,
    create_model,
    imagenet_model,
    preprocess_for,
    state_sha256,
)

log = logging.getLogger(__name__)

# Test hook: SIGKILL this process at a given global step, to prove that resume works after a
# real crash mid-epoch. Never set outside tests.
KILL_AT_STEP_ENV = "TRASHSORT_TEST_KILL_AT_STEP"


@dataclass
class TrainConfig:
    data: str
    model: str = DEFAULT_PRESET
    weights: str | None = None
    pretrained: bool = True
    size: int | None = None  # input height = width; None: the model's pretrained size
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # the pretrained layers' lr = lr * this; the new head gets lr
    weight_decay: float = 0.02
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    balance: bool = True  # class-weighted loss: trash is ~5 % of TrashNet
    ema_decay: float = 0.998  # 0 turns EMA off
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth in the blocks, 0 = off
    crop_scale_min: float = 0.35
    trivial_augment: bool = False  # TrivialAugment instead of the colour jitter (data.Augment)
    mixup: float = 0.0  # Beta alpha of mixup, 0 = off
    cutmix: float = 0.0  # Beta alpha of CutMix, 0 = off
    imagenet_distill: float = 0.0  # weight of the ImageNet-knowledge term (ImagenetDistill), 0 = off
    patience: int = 12  # epochs without val improvement before stopping early
    seed: int = 0
    val_fraction: float = 0.15  # used only when the data has no splits.csv
    threads: int | None = None
    out_dir: str = "runs"
    run_name: str | None = None
    name: str | None = None  # bundle/manifest name; default "<data folder>-<model>"
    streams: dict[str, str] = field(default_factory=dict)  # class -> recycling stream

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    manifest: Manifest
    metrics: dict[str, Any]


def train(cfg: TrainConfig, progress: bool = True) -> RunResult:
    """Fine-tune from scratch into a new run folder."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{stamp}-{cfg.model.replace('/', '_')}")
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"{run_dir}: run already exists; resume it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", asdict(cfg))
    return _run(cfg, run_dir, progress)


def resume(run_dir: str | Path, progress: bool = True) -> RunResult:
    """Continue an interrupted run from its last completed epoch."""
    run_dir, cfg = load_run_config(run_dir)
    return _run(cfg, run_dir, progress)


def load_run_config(checkpoint: str | Path) -> tuple[Path, TrainConfig]:
    """A run's folder and training config, from the folder or its checkpoint.pt."""
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.json)")
    return run_dir, TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


def param_groups(model: torch.nn.Module, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """The new classifier at ``lr``, the pretrained rest at ``lr * backbone_lr_scale``: a smaller
    step for the backbone keeps its features nearer ImageNet's (less over-fitting on a small set)."""
    if backbone_lr_scale == 1.0:  # one group, as runs from before this option resume with
        return [{"params": list(model.parameters()), "lr": lr}]
    prefix = classifier_prefix(model) + "."
    named = list(model.named_parameters())
    head = [p for n, p in named if n.startswith(prefix)]
    backbone = [p for n, p in named if not n.startswith(prefix)]
    return [{"params": head, "lr": lr}, {"params": backbone, "lr": lr * backbone_lr_scale}]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class ImagenetDistill:
    """Learning without Forgetting toward ImageNet: a copy of the pretrained ImageNet classifier,
    fed the fine-tuned features, is pulled toward the pretrained model's own ImageNet predictions
    (KL divergence at temperature 2), so fine-tuning keeps more of what told ImageNet's 1,000
    classes apart. Only this term's ImageNet head is extra; the shipped model is unchanged."""

    temperature = 2.0

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.head = copy.deepcopy(teacher.get_classifier()).requires_grad_(True)
        features: dict[str, torch.Tensor] = {}
        # a closure, not a bound method: the EMA copy of the model deep-copies its hooks
        model.get_classifier().register_forward_pre_hook(lambda _m, args: features.update(x=args[0]))
        self._features = features

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """For the batch ``x`` (normalized) the model has just run on."""
        t = self.temperature
        with torch.no_grad():
            target = F.log_softmax(self.teacher(x) / t, 1)
        student = F.log_softmax(self.head(self._features["x"]) / t, 1)
        return t * t * F.kl_div(student, target, log_target=True, reduction="batchmean")


def _run(cfg: TrainConfig, run_dir: Path, progress: bool) -> RunResult:
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.imagenet_distill > 0 and not cfg.pretrained:
        raise ValueError("--imagenet-distill needs the pretrained ImageNet model, not --no-pretrained")
    folder = data_mod.scan_folder(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    model, model_info = create_model(cfg.model, len(folder.classes), pretrained=cfg.pretrained,
                                     weights=cfg.weights, drop_rate=cfg.drop_rate,
                                     drop_path_rate=cfg.drop_path_rate)
    preprocess = preprocess_for(model, cfg.size)
    size = preprocess.size[0]
    decoded = data_mod.decode_splits(folder, preprocess, progress=progress)
    train_set, val_set = decoded["train"], decoded["val"]
    if len(train_set.labels) == 0:
        raise data_mod.DatasetError(f"{cfg.data}: no readable training photos")
    if len(val_set.labels) == 0:
        raise data_mod.DatasetError(f"{cfg.data}: no readable val photos (check splits.csv)")
    write_json_atomic(run_dir / "data_report.json", data_mod.data_report(folder, decoded))

    name = cfg.name or f"{Path(cfg.data).resolve().name}-{cfg.model.replace('/', '_')}"
    manifest = new_manifest(name, folder.classes, preprocess, model_info, cfg.streams)
    manifest_path = run_dir / "manifest.json"

    model = model.to(memory_format=torch.channels_last)
    normalize = Normalize(preprocess.input.mean, preprocess.input.std)
    groups = param_groups(model, cfg.lr, cfg.backbone_lr_scale)
    distill = None
    if cfg.imagenet_distill > 0:
        distill = ImagenetDistill(model, imagenet_model(cfg.model, cfg.weights))
        groups.append({"params": list(distill.head.parameters()), "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set.labels) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    weights = (data_mod.class_weights(train_set.labels, len(folder.classes)) if cfg.balance else None)
    augment = data_mod.Augment(size=size, scale=(cfg.crop_scale_min, 1.0), trivial_augment=cfg.trivial_augment)
    val_images = data_mod.center_crops(val_set.images, size)

    start_epoch, best, bad_epochs = 0, -1.0, 0
    if (run_dir / "last.pt").exists():
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if distill is not None:
            distill.head.load_state_dict(state["imagenet_head"])
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        _truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
        log.info("resuming %s at epoch %d", run_dir, start_epoch + 1)

    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "-1"))
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(len(train_set.labels), generator=gen).numpy()
        model.train()
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress, unit="batch")
        for i in bar:
            step = epoch * steps_per_epoch + i
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            idx = np.sort(order[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            x = augment(train_set.images[idx], gen).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(train_set.labels[idx])
            x, partner, lam = data_mod.mix_batch(x, gen, cfg.mixup, cfg.cutmix)
            x = normalize(x)
            logits = model(x)
            loss = sum(share * F.cross_entropy(logits, target, weight=weights,
                                               label_smoothing=cfg.label_smoothing)
                       for share, target in ((lam, y), (1 - lam, y[partner])) if share > 0)
            if distill is not None:
                loss = loss + cfg.imagenet_distill * distill.loss(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model, step=step)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()

        eval_model = ema.module if ema is not None else model
        contract = ContractModel(eval_model, preprocess)
        val_probs = predict_probs(contract, val_images)
        val_top1 = float((val_probs.argmax(1) == val_set.labels).mean())
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                  "val_top1": val_top1, "lr": scheduler.get_last_lr()[0],
                  "seconds": round(time.perf_counter() - t0, 2)}
        improved = val_top1 > best
        if improved:
            best, bad_epochs = val_top1, 0
            save_checkpoint(run_dir / "checkpoint.pt", eval_model, manifest, manifest_path)
        else:
            bad_epochs += 1
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        _save_resume_state(run_dir / "last.pt", model, optimizer, scheduler, ema, distill, epoch, best,
                           bad_epochs)
        msg = (f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.3f}  "
               f"train {record['train_top1']:.3f}  val {val_top1:.4f}{'  *' if improved else ''}  "
               f"({record['seconds']:.0f}s)")
        if progress:
            tqdm.write(msg)
        log.info(msg)

    model_best, manifest = load_checkpoint(run_dir / "checkpoint.pt")
    metrics = compute_metrics(val_set.labels, predict_probs(model_best, val_images), manifest.class_names)
    manifest.metrics = {"val": {k: metrics[k] for k in ("top1", "macro_f1", "ece", "count")}}
    manifest.save(manifest_path)
    write_report(metrics, run_dir, extra={"split": "val", "checkpoint": str(run_dir / "checkpoint.pt")})
    if progress:
        tqdm.write(format_summary(metrics))
    _point_latest(run_dir)
    return RunResult(run_dir, run_dir / "checkpoint.pt", manifest, metrics)


def save_checkpoint(path: Path, model: torch.nn.Module, manifest: Manifest, manifest_path: Path) -> None:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"arch": manifest.model.arch, "num_classes": manifest.num_classes, "state_dict": state}, buf)
    write_bytes_atomic(path, buf.getvalue())
    manifest.model.checkpoint_sha256 = state_sha256(state)
    manifest.model.backbone_sha256 = backbone_sha256(model)
    manifest.save(manifest_path)


def _save_resume_state(path: Path, model, optimizer, scheduler, ema, distill, epoch: int, best: float,
                       bad_epochs: int) -> None:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                "imagenet_head": distill.head.state_dict() if distill else None,
                "epoch": epoch, "best": best, "bad_epochs": bad_epochs}, buf)
    write_bytes_atomic(path, buf.getvalue())


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    """Drop epoch records written after the state we resume from (a crash between the two writes)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= start_epoch]
        write_bytes_atomic(path, "".join(line + "\n" for line in keep).encode())


def _point_latest(run_dir: Path) -> None:
    """runs/latest -> this run, replaced atomically."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def load_checkpoint(path: str | Path) -> tuple[ContractModel, Manifest]:
    """A trained checkpoint (or its run folder) as a contract model, with the manifest beside it."""
    from pipeline import manifest as manifest_mod

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    manifest = manifest_mod.load(path.parent / "manifest.json")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    except Exception as e:
        raise ValueError(f"{path}: not a trashsort checkpoint ({type(e).__name__}: {e})") from None
    if manifest.model.checkpoint_sha256 and state_sha256(state) != manifest.model.checkpoint_sha256:
        raise ManifestError(f"{path}: weights do not match the manifest's checkpoint_sha256")
    if ckpt.get("num_classes") != manifest.num_classes:
        raise ManifestError(f"{path}: checkpoint has {ckpt.get('num_classes')} classes, "
                            f"manifest {manifest.num_classes}")
    model, _ = create_model(ckpt["arch"], manifest.num_classes, pretrained=False)
    model.load_state_dict(state)
    return ContractModel(model.eval(), manifest.preprocess).eval(), manifest

