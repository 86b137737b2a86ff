"""The ``trashsort`` command line: train, evaluate, predict, export, bench, and head changes
(add-class, retrain-head, remove-class, rename-class).

Every expected failure (missing folder, bad weights, class mismatch, broken manifest) ends with
one clear ``Error:`` line and exit status 1 instead of a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge.bundle import BundleInvalid
from pipeline.manifest import ManifestError

EXPECTED_ERRORS: tuple[type[Exception], ...] = (ManifestError, BundleInvalid, FileNotFoundError,
                                                FileExistsError, ValueError)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors into one line on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def fail_on_gate(failures: dict[str, str]) -> None:
    """Exit 1 naming every artefact the parity gate left out, and why."""
    if failures:
        reasons = "; ".join(f"{file}: {why}" for file, why in failures.items())
        raise click.ClickException(f"parity gate failed, left out of the bundle: {reasons}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log more (decoding, resume, each epoch).")
def main(verbose: bool) -> None:
    """trashsort: fine-tune a recycling classifier and package it for phones, Pis and Jetsons."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_terminate)


def _exit_on_terminate(signum: int, frame: object) -> None:
    """``kill`` ends a command as Ctrl-C does: its clean-up runs (an export's staging folder is
    removed), instead of Python's default of stopping on the spot."""
    raise SystemExit(128 + signum)


@main.command()
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), required=False,
              help="Folder with one sub-folder per class (optional splits.csv).  "
                   "[default: $TRASHSORT_DATA]")
@click.option("--model", default="mobilenetv3_small", show_default=True,
              help="Preset (mobilenetv3_small, efficientnet_lite0) or any timm model name.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="Local ImageNet weights file (.pth). Default: $TRASHSORT_WEIGHTS_DIR, then the Hub.")
@click.option("--no-pretrained", is_flag=True, help="Start from random weights (tests only).")
@click.option("--size", type=int, help="Input size in pixels.  [default: the model's, 224]")
@click.option("--epochs", type=click.IntRange(min=1), default=40, show_default=True,
              help="Training epochs (early stopping may end sooner).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Photos per optimizer step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--backbone-lr-scale", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="The pretrained layers train at --lr times this (e.g. 0.1); "
                                      "the new classifier at --lr. Below 1 keeps the features "
                                      "nearer ImageNet's.")
@click.option("--patience", type=click.IntRange(min=1), default=12, show_default=True,
              help="Stop after this many epochs without a better val top-1.")
@click.option("--balance/--no-balance", default=True, show_default=True,
              help="Class-weighted loss (rare classes count as much as common ones).")
@click.option("--ema-decay", type=float, default=0.998, show_default=True,
              help="Weight EMA decay (0 = off); val and the checkpoint use the EMA weights.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              show_default=True, help="Label smoothing of the loss. 0 keeps the features more general "
                                      "(a base model for add-class).")
@click.option("--mixup", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Mixup Beta alpha (e.g. 0.2); 0 = off.")
@click.option("--cutmix", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="CutMix Beta alpha (e.g. 1.0); 0 = off. With --mixup too, one of the two per batch.")
@click.option("--trivial-augment", is_flag=True,
              help="TrivialAugment (one of 14 ops, e.g. shear, rotate, posterize, equalize, at a random "
                   "strength per photo) instead of the colour jitter.")
@click.option("--imagenet-distill", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of a term that keeps the pretrained model's ImageNet predictions "
                   "(Learning without Forgetting; e.g. 1); 0 = off. About a quarter more time per epoch.")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Stochastic depth: the chance that a training step skips a residual block, rising "
                   "with depth to this for the last one (e.g. 0.2, as EfficientNet was pretrained "
                   "with); 0 = off.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds weights, split (without splits.csv), order and augmentation.")
@click.option("--threads", type=int, help="CPU threads.  [default: all cores]")
@click.option("--out", "out_dir", default="runs", show_default=True, help="Where run folders go.")
@click.option("--run-name", help="Run folder name.  [default: <date>-<model>]")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue an interrupted run folder (other options are read from it).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def train(data: Path | None, model: str, weights: Path | None, no_pretrained: bool, size: int | None,
          epochs: int, batch_size: int, lr: float, backbone_lr_scale: float, patience: int, balance: bool,
          ema_decay: float, label_smoothing: float, mixup: float, cutmix: float, trivial_augment: bool,
          imagenet_distill: float, drop_path: float, seed: int, threads: int | None,
          out_dir: str, run_name: str | None, resume_dir: Path | None, quiet: bool) -> None:
    """Fine-tune a timm model on a class-folder dataset; writes runs/<id>/ with the checkpoint,
    manifest.json, metrics and the data report (runs/latest points at it)."""
    from pipeline import train as train_mod
    from pipeline.model import WeightsError

    try:
        if resume_dir is not None:
            result = train_mod.resume(resume_dir, progress=not quiet)
        else:
            data = data or _env_path("TRASHSORT_DATA", "--data")
            cfg = train_mod.TrainConfig(
                data=str(data), model=model, weights=str(weights) if weights else None,
                pretrained=not no_pretrained, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
                backbone_lr_scale=backbone_lr_scale, patience=patience, balance=balance, ema_decay=ema_decay,
                label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, trivial_augment=trivial_augment,
                imagenet_distill=imagenet_distill, drop_path_rate=drop_path, seed=seed, threads=threads,
                out_dir=out_dir, run_name=run_name)
            result = train_mod.train(cfg, progress=not quiet)
    except WeightsError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"run {result.run_dir}: val top-1 {result.metrics['top1']:.4f}, "
               f"macro-F1 {result.metrics['macro_f1']:.4f}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(file_okay=False, path_type=Path),
              help="Score this class-folder dataset as a whole (e.g. a held-out test set). "
                   "[default: the run's own val split]")
@click.option("--split", default="val", show_default=True,
              help="With the run's data: which split of splits.csv to score.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where metrics.json and the confusion matrix go.  [default: <run>/eval-<name>]")
@friendly_errors
def evaluate(checkpoint: Path, data: Path | None, split: str, out_dir: Path | None) -> None:
    """Score a checkpoint (a run folder or its checkpoint.pt): top-1, per-class P/R/F1, confusion
    matrix (CSV + PNG) and expected calibration error, written to metrics.json."""
    from pipeline import data as data_mod
    from pipeline.evaluate import compute_metrics, format_summary, predict_probs, write_report
    from pipeline.manifest import check_classes_match
    from pipeline.train import load_checkpoint, load_run_config

    model, manifest = load_checkpoint(checkpoint)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if data is not None:
        folder = data_mod.scan_folder(data, all_split="test")
        samples, label = folder.samples, data.name
    else:
        _, cfg = load_run_config(run_dir)
        folder = data_mod.scan_folder(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        samples, label = folder.split(split), split
        if not samples:
            raise click.ClickException(f"{cfg.data}: no photos in split {split!r}")
    check_classes_match(manifest, folder.classes, str(data or folder.root))
    pre = manifest.preprocess
    decoded = data_mod.decode_for(samples, pre)
    images = data_mod.center_crops(decoded.images, pre.size[0])
    metrics = compute_metrics(decoded.labels, predict_probs(model, images, progress=True),
                              manifest.class_names)
    out_dir = out_dir or run_dir / f"eval-{label}"
    write_report(metrics, out_dir, extra={"split": label, "data": str(data or folder.root),
                                          "checkpoint": str(checkpoint),
                                          "skipped": decoded.skipped})
    click.echo(format_summary(metrics))
    if decoded.skipped:
        click.echo(f"skipped {len(decoded.skipped)} unreadable file(s); see {out_dir / 'metrics.json'}")
    click.echo(f"wrote {out_dir / 'metrics.json'}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=Path("runs/latest"),
              show_default=True, help="Run folder or checkpoint.pt.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@friendly_errors
def predict(images: tuple[Path, ...], checkpoint: Path, top_k: int, as_json: bool) -> None:
    """Classify image files with a trained checkpoint (unreadable files are reported and skipped)."""
    import numpy as np

    from edge.preprocess import ImageDecodeError, load_rgb, resize_and_crop
    from pipeline.evaluate import predict_probs
    from pipeline.train import load_checkpoint

    model, manifest = load_checkpoint(checkpoint)
    pre = manifest.preprocess
    failures = 0
    for path in images:
        try:
            pixels = resize_and_crop(load_rgb(path), pre.size, pre.resize_shorter_to, pre.interpolation)
        except (ImageDecodeError, FileNotFoundError) as e:
            click.echo(f"warning: skipped {e}", err=True)
            failures += 1
            continue
        probs = predict_probs(model, pixels[None])[0]
        order = np.argsort(-probs)[:top_k]
        top = [{"label": manifest.classes[i].name, "stream": manifest.classes[i].stream,
                "probability": round(float(probs[i]), 4)} for i in order]
        if as_json:
            click.echo(json.dumps({"image": str(path), "top": top}))
        else:
            click.echo(f"{path}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in top))
    if failures == len(images):
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path), default=Path("runs/latest"))
@click.option("--data", type=click.Path(file_okay=False, path_type=Path),
              help="Class-folder dataset for calibration (train split) and the gate (val split). "
                   "[default: the run's own data]")
@click.option("--out", "out_dir", default="dist", show_default=True,
              help="Bundles go to OUT/<name>-v<version>/.")
@click.option("--formats", help="Comma list of artefacts: executorch, tflite, onnx or e.g. tflite-int8. "
                                "[default: all six]")
@click.option("--calibration", "calibration_count", type=click.IntRange(min=1), default=200,
              show_default=True, help="Training photos (stratified) to calibrate INT8 on.")
@click.option("--golden", "golden_count", type=click.IntRange(min=1), default=24, show_default=True,
              help="Val photos kept in golden/ with their expected outputs, for on-device checks.")
@click.option("--fp32-min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="Gate: share of val photos where an fp32 artefact's top-1 equals PyTorch's.")
@click.option("--int8-max-drop", type=click.FloatRange(0, 1), default=0.015, show_default=True,
              help="Gate: largest val top-1 drop of an INT8 artefact below PyTorch (0.015 = 1.5 pp).")
@click.option("--force", is_flag=True, help="Replace an existing bundle of the same name and version.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def export(checkpoint: Path, data: Path | None, out_dir: str, formats: str | None, calibration_count: int,
           golden_count: int, fp32_min_agreement: float, int8_max_drop: float, force: bool,
           quiet: bool) -> None:
    """Export a trained run (default runs/latest) to ExecuTorch .pte, LiteRT .tflite and ONNX, fp32
    and INT8; run each in its own runtime on val against PyTorch (the parity gate) and write the
    bundle. An artefact that fails the gate is left out and the command exits 1 with the reason."""
    from pipeline import bundle as bundle_mod
    from pipeline.export import select
    from pipeline.validate import Thresholds

    result = bundle_mod.export_run(
        checkpoint, data, calibration_count=calibration_count, golden_count=golden_count,
        out_dir=out_dir, artefacts=select(formats), force=force, progress=not quiet,
        thresholds=Thresholds(fp32_min_agreement, int8_max_drop))
    if result.path is not None:
        click.echo(bundle_mod.summary_line(result))
    fail_on_gate(result.failures)


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=Path("runs/latest"),
              show_default=True, help="The run the bundle came from (for the PyTorch eager row).")
@click.option("--runs", type=click.IntRange(min=50), default=100, show_default=True,
              help="Timed runs per runner and thread count, after warm-up.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where bench.md and bench.png go.  [default: the bundle folder]")
@friendly_errors
def bench(bundle: Path, checkpoint: Path, runs: int, out_dir: Path | None) -> None:
    """Latency (batch 1; one thread and all threads; median and p90), size and val top-1 of PyTorch
    eager and of every artefact in its runtime, as a markdown table with ratios to eager + a plot."""
    from pipeline import bench as bench_mod
    from pipeline.train import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    ckpt = checkpoint / "checkpoint.pt" if checkpoint.is_dir() else checkpoint
    rows = bench_mod.run_bench(bundle, model, ckpt.stat().st_size, runs=runs)
    path = bench_mod.write_bench(rows, out_dir or bundle, runs)
    click.echo(path.read_text())
    click.echo(f"wrote {path} and {path.with_suffix('.png')}")


# ---------------------------------------------------------------- head retraining (backbone frozen)

def head_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the head commands: where from, where to, what to export."""
    options = [
        click.option("--from", "source", required=True, type=click.Path(exists=True, path_type=Path),
                     help="A bundle (dist/...; its run must be on this machine) or a run folder."),
        click.option("--runs", "runs_dir", default="runs", show_default=True,
                     help="The new head run goes to RUNS/<name>-v<version>/."),
        click.option("--out", "out_dir", default="dist", show_default=True, help="Bundles go to OUT/."),
        click.option("--formats", help="Artefacts to export (as for export). From a bundle, its .tflite and "
                                       ".pte files and INT8 .onnx get the new head written in (seconds) "
                                       "instead of being converted again; from a run, all are converted.  "
                                       "[default: those of the --from bundle, else all six]"),
        click.option("--calibration", "calibration_count", type=click.IntRange(min=1), default=200,
                     show_default=True, help="Training photos to calibrate INT8 on."),
        click.option("--no-export", is_flag=True, help="Only the new head run, no bundle."),
        click.option("--force", is_flag=True, help="Replace an existing bundle of the same name and version."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


KEPT_CLASSES_MAX_DROP = 0.01  # the val top-1 the classes kept may lose before the CLI says so


def kept_classes_advice(before: float, after: float) -> str | None:
    """What to do when a head change costs the classes kept more than ``KEPT_CLASSES_MAX_DROP``."""
    drop = before - after
    if drop <= KEPT_CLASSES_MAX_DROP:
        return None
    return (f"the classes kept lost {100 * drop:.1f} pp of val top-1: a new head alone cannot hold them on "
            f"this backbone (fine-tuned on other classes than these). Retraining the whole model on all "
            f"classes (trashsort train) does; see README, 'New classes'.")


NEW_CLASS_MIN_RECALL = 0.5  # a class fitted in this change found in fewer of its val photos gets a note


def new_class_advice(name: str, recall: float, train_photos: int) -> str | None:
    """What to do when a class fitted in this change is found in too few of its val photos."""
    if recall >= NEW_CLASS_MIN_RECALL:
        return None
    return (f"{name} is found in {100 * recall:.0f} % of its val photos ({train_photos} training photos): "
            f"more photos of it (other sides, backgrounds, light) let the head find it more often; "
            f"see README, 'A few dozen photos'.")


def _finish_head_change(result: Any, source: Any, formats: str | None, out_dir: str, calibration_count: int,
                        no_export: bool, force: bool, quiet: bool, started: float) -> None:
    """Print what changed, export and gate the new run, print each phase's time."""
    import time

    from pipeline import bundle as bundle_mod
    from pipeline.export import select

    report = result.report
    old = report["old_classes_val_top1"]
    click.echo(f"head run {result.run_dir}: {len(report['classes'])} classes, "
               f"val top-1 {report['val']['top1']:.4f}, macro-F1 {report['val']['macro_f1']:.4f}")
    if old["count"]:
        click.echo(f"  classes kept: val top-1 {old['before']:.4f} before, {old['after']:.4f} after "
                   f"(n={old['count']})")
        advice = kept_classes_advice(old["before"], old["after"])
        if advice:
            click.echo(f"  note: {advice}")
    for name, c in report["per_class"].items():
        click.echo(f"  {name:<14} recall {c['recall']:.3f}  F1 {c['f1']:.3f}  (n={c['support']})")
    for name in report["new_classes"]:
        advice = new_class_advice(name, report["per_class"][name]["recall"], report["photos"]["train"][name])
        if advice:
            click.echo(f"  note: {advice}")
    same = report["backbone_sha256"]["before"] == report["backbone_sha256"]["after"]
    click.echo(f"  backbone sha256 {report['backbone_sha256']['after'][:16]}... "
               f"{'unchanged' if same else 'CHANGED'}; embeddings computed {report['embeddings']['computed']}, "
               f"cached {report['embeddings']['cached']}")
    seconds = dict(report["seconds"])
    failures: dict[str, str] = {}
    if not no_export:
        t0 = time.perf_counter()
        artefacts = select(formats or (",".join(source.formats) if source.formats else None))
        export = bundle_mod.export_run(result.run_dir, calibration_count=calibration_count, out_dir=out_dir,
                                       artefacts=artefacts, force=force, progress=not quiet,
                                       head_source=source.bundle)
        seconds["export_gate"] = round(time.perf_counter() - t0, 2)
        if export.path is not None:
            click.echo(bundle_mod.summary_line(export))
        failures = export.failures
    seconds["total"] = round(time.perf_counter() - started, 2)
    click.echo("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    fail_on_gate(failures)


@main.command("add-class")
@head_options
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of photos of the new class, or a folder of class folders (several classes).")
@click.option("--name", help="Class name for a single folder of photos.  [default: the folder's name]")
@click.option("--stream", help="Recycling stream of the new class(es), e.g. 'hazardous-waste'.")
@click.option("--replace", is_flag=True, help="Retrain an existing class on these photos instead.")
@click.option("--min-photos", type=click.IntRange(min=2), default=10, show_default=True,
              help="Fewest photos a new class may have.")
@friendly_errors
def add_class(source: Path, runs_dir: str, out_dir: str, formats: str | None, calibration_count: int,
              no_export: bool, force: bool, quiet: bool, images: Path, name: str | None, stream: str | None,
              replace: bool, min_photos: int) -> None:
    """Add one or more classes by retraining only the classifier head (backbone frozen, its
    embeddings cached), then export and gate a new bundle with a new manifest version."""
    import time

    from pipeline import head

    started = time.perf_counter()
    src = head.load_source(source)
    new = head.new_class_folders(images, name)
    result = head.add_classes(src, new, streams={n: stream for n in new}, replace=replace, out_dir=runs_dir,
                              min_photos=min_photos, progress=not quiet)
    _finish_head_change(result, src, formats, out_dir, calibration_count, no_export, force, quiet, started)


@main.command("retrain-head")
@head_options
@friendly_errors
def retrain_head(source: Path, runs_dir: str, out_dir: str, formats: str | None, calibration_count: int,
                 no_export: bool, force: bool, quiet: bool) -> None:
    """Refit the classifier head on the classes' current photos (more or corrected data); same
    classes, backbone frozen; then export and gate a new bundle."""
    import time

    from pipeline import head

    started = time.perf_counter()
    src = head.load_source(source)
    result = head.retrain_only(src, out_dir=runs_dir, progress=not quiet)
    _finish_head_change(result, src, formats, out_dir, calibration_count, no_export, force, quiet, started)


@main.command("remove-class")
@head_options
@click.argument("names", nargs=-1, required=True)
@friendly_errors
def remove_class(source: Path, runs_dir: str, out_dir: str, formats: str | None, calibration_count: int,
                 no_export: bool, force: bool, quiet: bool, names: tuple[str, ...]) -> None:
    """Remove classes (the head is refitted on the others; ids after a removed class move up)."""
    import time

    from pipeline import head

    started = time.perf_counter()
    src = head.load_source(source)
    result = head.remove_classes(src, list(names), out_dir=runs_dir, progress=not quiet)
    _finish_head_change(result, src, formats, out_dir, calibration_count, no_export, force, quiet, started)


@main.command("rename-class")
@click.option("--from", "source", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A bundle (a renamed copy is written beside it) or a run folder (its manifest is updated).")
@click.argument("old")
@click.argument("new")
@click.option("--out", "out_dir", help="Where the renamed bundle goes.  [default: beside the bundle]")
@click.option("--force", is_flag=True, help="Replace an existing bundle of the same name and version.")
@friendly_errors
def rename_class(source: Path, old: str, new: str, out_dir: str | None, force: bool) -> None:
    """Rename a class: the manifest only (same model, same artefacts and hashes; new manifest version)."""
    from pipeline import bundle as bundle_mod
    from pipeline import head
    from pipeline.manifest import Manifest

    if (source / "checkpoint.pt").is_file():
        manifest = head.rename_in_run(source, old, new)
        click.echo(f"renamed {old} to {new} in {source}/manifest.json (version {manifest.version})")
        return
    from edge.bundle import read_manifest

    manifest = head.rename_class(Manifest.from_dict(read_manifest(source)), old, new)
    path = bundle_mod.rewrite_manifest(source, manifest, {old: new}, out_dir, force)
    click.echo(f"renamed {old} to {new}: bundle {path} (manifest version {manifest.version}, same artefacts)")


def _env_path(var: str, option: str) -> Path:
    import os

    value = os.environ.get(var)
    if not value:
        raise click.UsageError(f"{option} is required (or set ${var})")
    return Path(value)


if __name__ == "__main__":
    main()
