"""Export a trained run into a verified bundle: every artefact exported, run in its real runtime on
val, gated against PyTorch, and written with the manifest, labels, golden set and report.

``dist/<name>-v<version>/``::

    manifest.json      classes, input contract, and per artefact: file, format, precision, bytes,
                       sha256, input/output tensors, val metrics, golden tolerance
    model_*.pte|.tflite|.onnx
    labels.txt         class names, one per line, in output order (from the manifest)
    golden/            a few val photos + expected.json (input tensor hashes, per-artefact probabilities)
    report.md          accuracy / size / latency table

The bundle is built in a hidden temp folder beside the final one and renamed when complete, so an
interrupted export never leaves a half bundle under the final name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from edge.bundle import input_contract_problems, sha256_file, verify
from edge.head import HEAD_FILES, head_bytes, read_classifier
from edge.runtimes import captured_output, measure_latency, softmax
from pipeline import data as data_mod
from pipeline.evaluate import predict_probs
from pipeline.export import ARTEFACTS, ArtefactSpec, driver
from pipeline.export.equalize import equalize_activations
from pipeline.manifest import Manifest, Preprocess, write_bytes_atomic, write_json_atomic
from pipeline.validate import Thresholds, gate, parity

log = logging.getLogger(__name__)

# How closely a device must reproduce the golden probabilities recorded here (other CPUs, other
# kernels: fp32 differs in the last bits, INT8 by a rounding step here and there).
GOLDEN_TOLERANCE = {"fp32": {"min_agreement": 1.0, "max_prob_diff": 0.01},
                    "int8": {"min_agreement": 0.95, "max_prob_diff": 0.1}}


class BundleError(ValueError):
    """A bundle that cannot be built (or was built without some artefacts), with the reasons."""


@dataclass
class ExportData:
    """What an export needs from the data: val photos with labels, calibration and golden photos."""

    val_images: np.ndarray  # uint8 (N, H, W, 3): the contract's input tensors
    val_labels: np.ndarray
    calibration: np.ndarray  # uint8 (M, H, W, 3), real training photos
    golden_squares: np.ndarray  # uint8 (G, S, S, 3): shorter side already resized, before the crop
    golden_labels: np.ndarray
    decoded: dict[str, data_mod.DecodedSplit]  # train and val as decoded (for the embedding cache)


Reusable = dict[str, tuple[Path, dict[str, Any]]]  # a head change's source artefacts: file -> (path, entry)


@dataclass
class BundleResult:
    path: Path | None
    manifest: Manifest | None
    failures: dict[str, str] = field(default_factory=dict)  # artefact file -> why it was left out


def stratified_pick(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` indices spread over the classes in proportion (at least one per class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    picked: list[int] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        share = max(1, round(count * len(idx) / len(labels)))
        picked += rng.permutation(idx)[:share].tolist()
    return np.sort(np.array(picked[:max(count, len(classes))], dtype=np.int64))


def load_export_data(folder: data_mod.ImageFolder, preprocess: Preprocess, calibration_count: int = 200,
                     golden_count: int = 24, seed: int = 0, progress: bool = True,
                     whole_train: bool = True) -> ExportData:
    """Decode (through the cache) val and train; pick calibration and golden photos, stratified.

    ``whole_train=False`` decodes only the calibration photos of train (a head change: its photos
    are embedded already, and decoding all of them would be most of the change's time)."""
    size = preprocess.size[0]
    if not whole_train:
        train_samples = folder.split("train")
        labels = np.array([s.label for s in train_samples], dtype=np.int64)
        calibration_samples = [train_samples[i] for i in stratified_pick(labels, calibration_count, seed)]
        folder = data_mod.ImageFolder(folder.root, folder.classes, calibration_samples + folder.split("val"),
                                      folder.split_source)
    decoded = data_mod.decode_splits(folder, preprocess, progress=progress)
    train, val = decoded["train"], decoded["val"]
    calib = stratified_pick(train.labels, calibration_count, seed) if whole_train else np.arange(len(train.labels))
    if len(val.labels) == 0 or len(train.labels) == 0:
        raise BundleError(f"{folder.root}: export needs readable train (calibration) and val (gate) photos")
    golden = stratified_pick(val.labels, golden_count, seed)
    return ExportData(
        val_images=data_mod.center_crops(val.images, size), val_labels=val.labels,
        calibration=np.ascontiguousarray(data_mod.center_crops(train.images[calib], size)),
        golden_squares=val.images[golden], golden_labels=val.labels[golden], decoded=decoded,
    )


def build_bundle(
    model: Any, manifest: Manifest, data: ExportData, out_dir: str | Path = "dist",
    artefacts: tuple[ArtefactSpec, ...] = ARTEFACTS, thresholds: Thresholds | None = None,
    force: bool = False, progress: bool = True, head_source: str | Path | None = None,
) -> BundleResult:
    """Export, gate and bundle. Artefacts that fail the gate are left out and listed in the result.

    ``head_source``: the bundle a head change started from. Its artefacts, if their driver can write
    a new classifier into them (``.tflite``, ``.pte``, INT8 ``.onnx``) and the backbone and
    preprocessing are this model's, are reused with the new head instead of being converted again;
    they are gated like any export."""
    thresholds = thresholds or Thresholds()
    final = Path(out_dir) / f"{manifest.name}-v{manifest.version}"
    if final.exists() and not force:
        raise BundleError(f"{final}: bundle already exists (use --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        reusable = _reusable_artefacts(head_source, manifest) if head_source else {}
        result = _build(model, manifest, data, staging, artefacts, thresholds, progress, reusable)
        if result.manifest is None:
            shutil.rmtree(staging)
            return result
        verify(staging)  # what was written is what the manifest says
        _replace_dir(staging, final)
        result.path = final
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _reusable_artefacts(bundle: str | Path, manifest: Manifest) -> Reusable:
    """Artefacts of ``bundle`` (verified: path and manifest entry) that only differ from this
    model's by the head."""
    source = Manifest.from_dict(verify(bundle), f"{bundle}/manifest.json")
    if (source.model.backbone_sha256 != manifest.model.backbone_sha256 or source.model.backbone_sha256 is None
            or source.preprocess != manifest.preprocess):
        log.info("%s: another backbone or preprocessing; every artefact is converted anew", bundle)
        return {}
    return {a["file"]: (Path(bundle) / a["file"], a) for a in source.artefacts}


def _classifier(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The contract model's classifier weight and bias (None without a bias)."""
    head = model.model.get_classifier()
    if getattr(head, "bias", None) is None:
        return None
    return head.weight.detach().numpy(), head.bias.detach().numpy()


def _with_new_head(model: Any, spec: ArtefactSpec, reusable: Reusable,
                   calibration_features: Callable[[], np.ndarray]) -> tuple[bytes | None, dict[str, Any]]:
    """The reusable artefact for ``spec`` with ``model``'s classifier written in, if its driver can
    (INT8: given the calibration photos' embeddings, ``calibration_features()``, and what the source's
    export chose, which the new file keeps), and its manifest facts."""
    write_head = getattr(driver(spec.format), "with_new_head", None)
    classifier = _classifier(model)
    if spec.file not in reusable or write_head is None or classifier is None:
        return None, {}
    path, entry = reusable[spec.file]
    features = calibration_features() if spec.precision == "int8" else None
    choice = entry.get("int8_candidate")
    payload = write_head(path.read_bytes(), *classifier, features, choice)
    return payload, ({"int8_candidate": choice} if choice is not None else {})


def _export(fmt_driver: Any, model: Any, spec: ArtefactSpec, calibration: np.ndarray,
            reusable: Reusable) -> tuple[bytes, dict[str, Any]]:
    """The driver's export, with what it chose where it chooses (``export_chosen``); a head change
    hands it the source artefact's entry, whose choice was made for the same backbone."""
    export_chosen = getattr(fmt_driver, "export_chosen", None)
    if export_chosen is None:
        return fmt_driver.export(model, spec.precision, calibration), {}
    source_entry = reusable[spec.file][1] if spec.file in reusable else {}
    return export_chosen(model, spec.precision, calibration, source_entry.get("int8_candidate"))


def _write_head_update(staging: Path, payload: bytes, precision: str, from_sha256: str) -> dict[str, Any]:
    """Write the head file of a head-changed ``.tflite`` (its classifier as stored in it) and describe
    how a device rebuilds the artefact from the previous one (edge/head.py)."""
    weight, bias, quantization = read_classifier(payload)
    path = staging / HEAD_FILES[precision]
    write_bytes_atomic(path, head_bytes(weight, bias, quantization))
    return {"from_sha256": from_sha256, "file": path.name, "sha256": sha256_file(path),
            "bytes": path.stat().st_size, "shape": list(weight.shape)}


def _build(model: Any, manifest: Manifest, data: ExportData, staging: Path, artefacts: tuple[ArtefactSpec, ...],
           thresholds: Thresholds, progress: bool, reusable: Reusable) -> BundleResult:
    classes = manifest.class_names
    reference = predict_probs(model, data.val_images)
    reference_top1 = float((reference.argmax(1) == data.val_labels).mean())
    golden_inputs = data_mod.center_crops(data.golden_squares, manifest.preprocess.size[0])
    golden_reference = predict_probs(model, golden_inputs)

    @functools.cache  # once, when first needed
    def int8_model() -> tuple[Any, int]:
        """INT8 drivers quantize a float-identical copy with equalized activation ranges (equalize.py)."""
        return equalize_activations(model, data.calibration)

    @functools.cache
    def calibration_features() -> np.ndarray:
        """The classifier's input on the calibration photos: a head written into an INT8 artefact."""
        from pipeline.head import embed

        return embed(model, data.calibration)

    entries, golden_probs, failures = [], {}, {}
    bar = tqdm(artefacts, desc="export", unit="artefact", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.file)
        path = staging / spec.file
        fmt_driver = driver(spec.format)
        # A head change first writes the new head into the source's file; should that fail the gate
        # (its INT8 ranges were calibrated without the new photos), the artefact is converted anew.
        for write_head in (True, False) if spec.file in reusable else (False,):
            t0 = time.perf_counter()
            payload, facts = None, {}
            if write_head:
                payload, facts = _with_new_head(model, spec, reusable, calibration_features)
            head_written = payload is not None
            if head_written:  # the source's equalization is what the INT8 file still holds
                equalized = reusable[spec.file][1].get("equalized_relu_boundaries", 0)
            else:
                to_export, equalized = int8_model() if spec.precision == "int8" else (model, 0)
                with captured_output():  # the converters' own logs; shown only if the export fails
                    payload, facts = _export(fmt_driver, to_export, spec, data.calibration, reusable)
            write_bytes_atomic(path, payload)
            export_s = time.perf_counter() - t0
            with captured_output():  # runtimes log their CPU probing
                runner = fmt_driver.Runner(path, threads=1)
            io = runner.io
            problems = input_contract_problems(io, manifest.preprocess.size, manifest.num_classes)
            probs = softmax(runner(data.val_images))
            result = parity(probs, reference, data.val_labels, classes)
            reason = "; ".join(problems) or gate(result, reference_top1, spec.precision, thresholds)
            if not (reason and head_written):
                break
            tqdm.write(f"  {spec.file} with the new head written in: {reason}; converting it anew")
        if reason:
            failures[spec.file] = reason
            path.unlink()
            tqdm.write(f"  FAIL {spec.file}: {reason}")
            continue
        latency = measure_latency(runner, data.val_images[0])
        golden_probs[spec.file] = softmax(runner(golden_inputs)).round(6).tolist()
        describe = getattr(fmt_driver, "describe", None)  # facts only the file knows
        entries.append({
            "file": spec.file, "format": spec.format, "precision": spec.precision,
            "bytes": path.stat().st_size, "sha256": sha256_file(path), **io,
            **(describe(payload) if describe else {}), **facts,
            "val": result, "latency_1thread": latency, "export_seconds": round(export_s, 1),
            "golden_tolerance": GOLDEN_TOLERANCE[spec.precision],
            **({"equalized_relu_boundaries": equalized} if spec.precision == "int8" else {}),
        })
        if head_written:
            from_sha256 = reusable[spec.file][1]["sha256"]
            if spec.format == "tflite":  # a device can rebuild it from the previous file (edge/head.py)
                entries[-1]["head_update"] = _write_head_update(staging, payload, spec.precision, from_sha256)
            else:  # written here only; a device takes the whole file
                entries[-1]["head_written_into"] = from_sha256
        tqdm.write(f"  ok   {spec.file}: {path.stat().st_size / 1e6:.2f} MB, val top-1 {result['top1']:.4f}, "
                   f"agreement {result['agreement']:.4f}, {latency['median_ms']:.2f} ms")
    bar.close()
    if not entries:
        return BundleResult(None, None, failures)

    bundle_manifest = Manifest.from_dict(manifest.to_dict())
    bundle_manifest.artefacts = entries
    bundle_manifest.metrics = {**manifest.metrics, "pytorch_val": {"top1": reference_top1,
                                                                   "count": int(len(data.val_labels))},
                               "gate": {"fp32_min_agreement": thresholds.fp32_min_agreement,
                                        "int8_max_top1_drop": thresholds.int8_max_top1_drop}}
    bundle_manifest.add_history(f"exported {', '.join(e['file'] for e in entries)}", bump=False)
    bundle_manifest.save(staging / "manifest.json")
    (staging / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    _write_golden(staging / "golden", data, golden_inputs, golden_reference, golden_probs, classes)
    (staging / "report.md").write_text(report_markdown(bundle_manifest, failures), encoding="utf-8")
    return BundleResult(None, bundle_manifest, failures)


def _write_golden(folder: Path, data: ExportData, inputs: np.ndarray, reference: np.ndarray,
                  probs: dict[str, list], classes: list[str]) -> None:
    """Golden photos as PNG squares (shorter side already at the contract's resize, so a device's
    resize is the identity and its crop must give exactly ``input_sha256``), with expected outputs."""
    folder.mkdir()
    images = []
    for i, (square, label, tensor) in enumerate(zip(data.golden_squares, data.golden_labels, inputs)):
        name = f"{i:03d}_{classes[label]}.png"
        Image.fromarray(square).save(folder / name)
        images.append({"file": name, "label": classes[label],
                       "input_sha256": hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()})
    write_json_atomic(folder / "expected.json", {"images": images, "pytorch": reference.round(6).tolist(),
                                                 "artefacts": probs})


def report_markdown(manifest: Manifest, failures: dict[str, str]) -> str:
    pt = manifest.metrics["pytorch_val"]
    lines = [f"# {manifest.name} v{manifest.version}", "",
             f"Classes: {', '.join(manifest.class_names)}. Input: uint8 RGB NHWC "
             f"{manifest.preprocess.size[0]}x{manifest.preprocess.size[1]} "
             f"(shorter side to {manifest.preprocess.resize_shorter_to}, center crop).", "",
             f"PyTorch val top-1: {pt['top1']:.4f} (n={pt['count']}).", "",
             "| artefact | size (MB) | val top-1 | macro-F1 | agreement with PyTorch | max prob diff "
             "| latency ms (1 thread, median / p90) |",
             "|---|---|---|---|---|---|---|"]
    for a in manifest.artefacts:
        v, lat = a["val"], a["latency_1thread"]
        lines.append(f"| {a['file']} | {a['bytes'] / 1e6:.2f} | {v['top1']:.4f} | {v['macro_f1']:.4f} | "
                     f"{v['agreement']:.4f} | {v['max_prob_diff']:.4f} | "
                     f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f} |")
    for file, reason in failures.items():
        lines.append(f"| {file} | left out: {reason} | | | | | |")
    lines += ["", "Latency: batch 1, this export machine, a quick measure; `trashsort bench` measures "
              "properly.", ""]
    return "\n".join(lines)


def _replace_dir(staging: Path, final: Path) -> None:
    """Put the finished bundle under its final name; an older bundle there is removed only after."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary_line(result: BundleResult) -> str:
    m = result.manifest
    assert m is not None
    accs = ", ".join(f"{a['file']} {a['val']['top1']:.4f}" for a in m.artefacts)
    return f"bundle {result.path}: PyTorch val top-1 {m.metrics['pytorch_val']['top1']:.4f}; {accs}"


def export_run(checkpoint: str | Path, data: str | Path | None = None, calibration_count: int = 200,
               golden_count: int = 24, **bundle_options: Any) -> BundleResult:
    """Export a run (its folder or checkpoint.pt) with its own data split unless ``data``; a head run
    (``classes.json``) takes each class's photos from where that file says."""
    from pipeline.manifest import check_classes_match
    from pipeline.train import load_checkpoint, load_run_config

    model, manifest = load_checkpoint(checkpoint)
    run_dir, cfg = load_run_config(checkpoint)
    if data is None and (run_dir / "classes.json").is_file():
        from pipeline.head import class_folder, load_class_sources

        folder = class_folder(load_class_sources(run_dir), cfg)
    else:
        folder = data_mod.scan_folder(data or cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    check_classes_match(manifest, folder.classes, str(folder.root))
    manifest.model.checkpoint = str((run_dir / "checkpoint.pt").resolve())  # head retraining starts here
    head_run = (run_dir / "classes.json").is_file()  # its photos are embedded already
    export_data = load_export_data(folder, manifest.preprocess, calibration_count, golden_count, cfg.seed,
                                   progress=bundle_options.get("progress", True), whole_train=not head_run)
    result = build_bundle(model, manifest, export_data, **bundle_options)
    if result.path is not None and not head_run:
        from pipeline.head import warm_embedding_cache

        new = warm_embedding_cache(model, manifest, export_data.decoded)
        log.info("embedding cache for head retraining: %d photo(s) embedded", new)
    return result


def rewrite_manifest(bundle: str | Path, manifest: Manifest, renames: dict[str, str] | None = None,
                     out_dir: str | Path | None = None, force: bool = False) -> Path:
    """A copy of a bundle under a new manifest (same artefacts, e.g. a class renamed), as
    ``<out_dir>/<name>-v<version>``; written beside and renamed when complete, like any bundle."""
    bundle = Path(bundle)
    verify(bundle)
    final = Path(out_dir or bundle.parent) / f"{manifest.name}-v{manifest.version}"
    if final.exists() and not force:
        raise BundleError(f"{final}: bundle already exists (use --force to replace it)")
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(bundle, staging)
        manifest.save(staging / "manifest.json")
        names = manifest.class_names
        (staging / "labels.txt").write_text("".join(f"{c}\n" for c in names), encoding="utf-8")
        expected_path = staging / "golden" / "expected.json"
        if expected_path.is_file():
            expected = json.loads(expected_path.read_text(encoding="utf-8"))
            for item in expected["images"]:
                item["label"] = (renames or {}).get(item["label"], item["label"])
            write_json_atomic(expected_path, expected)
        (staging / "report.md").write_text(report_markdown(manifest, {}), encoding="utf-8")
        verify(staging)
        _replace_dir(staging, final)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
