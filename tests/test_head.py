"""Head retraining: add a class end to end (backbone byte-identical, manifest version and ids, the
edge runner validating the new bundle), the embedding cache, each bad input, rename and remove."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edge import classify
from edge.bundle import read_manifest, sha256_file, verify
from pipeline import data as data_mod
from pipeline import head
from pipeline.bundle import export_run
from pipeline.cli import main
from pipeline.export import select
from pipeline.model import backbone_sha256, classifier_prefix
from pipeline.train import load_checkpoint
from tests.conftest import make_photo


def photos(folder: Path, count: int, colour: tuple[int, int, int], seed: int = 1) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        make_photo(rng, colour).save(folder / f"{folder.name}{i}.jpg", quality=90)
    return folder


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def backbone_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(run_dir)
    prefix = classifier_prefix(model.model) + "."
    return {k: v for k, v in model.model.state_dict().items() if not k.startswith(prefix)}


def test_add_class_end_to_end(exported, tmp_path: Path) -> None:
    bundle = exported["result"].path
    base = read_manifest(bundle)
    battery = photos(tmp_path / "battery", 16, (200, 30, 30))
    done = cli("add-class", "--from", str(bundle), "--images", str(battery), "--stream", "hazardous-waste",
               "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "dist"),
               "--calibration", "24", "--quiet")  # the formats of the source bundle: all six
    assert done.exit_code == 0, done.output
    assert "classes kept: val top-1" in done.output and "unchanged" in done.output

    run_dir = tmp_path / "runs" / f"{base['name']}-v{base['version'] + 1}"
    report = json.loads((run_dir / "head_report.json").read_text())
    assert report["per_class"]["battery"]["recall"] == 1.0  # a colour no other class has
    assert report["new_classes"] == ["battery"]
    assert report["old_classes_val_top1"]["after"] >= report["old_classes_val_top1"]["before"] - 0.01
    # The backbone is byte-identical: every tensor but the head's.
    before, after = backbone_tensors(exported["run"].run_dir), backbone_tensors(run_dir)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert report["backbone_sha256"]["before"] == report["backbone_sha256"]["after"]

    new_bundle = tmp_path / "dist" / f"{base['name']}-v{base['version'] + 1}"
    manifest = verify(new_bundle)
    assert manifest["version"] == base["version"] + 1
    assert manifest["classes"][:3] == base["classes"]  # stable ids and names for the existing classes
    assert manifest["classes"][3] == {"id": 3, "name": "battery", "stream": "hazardous-waste"}
    assert manifest["model"]["backbone_sha256"] == report["backbone_sha256"]["after"]
    assert [h["change"] for h in manifest["history"]][-2:] == [
        "added battery (head only)",
        "exported model_fp32.pte, model_int8.pte, model_fp32.tflite, model_int8.tflite, model_fp32.onnx, "
        "model_int8.onnx"]
    entries = {a["file"]: a for a in manifest["artefacts"]}
    assert sorted(entries) == ["model_fp32.onnx", "model_fp32.pte", "model_fp32.tflite", "model_int8.onnx",
                               "model_int8.pte", "model_int8.tflite"]
    # the .tflite and .pte files and the INT8 .onnx are the source bundle's with the new head written in
    # (INT8: quantized here; the .pte as its export's kept candidate, which the entry keeps), not
    # converted again
    for written in ("model_fp32.tflite", "model_int8.tflite"):
        assert entries[written]["head_update"]["from_sha256"] == sha256_file(bundle / written)
        assert entries[written]["outputs"][0]["shape"] == [1, 4]
    assert entries["model_fp32.tflite"]["val"]["agreement"] == 1.0
    for written in ("model_fp32.pte", "model_int8.pte", "model_int8.onnx"):
        assert entries[written]["head_written_into"] == sha256_file(bundle / written)
        assert entries[written]["outputs"][0]["shape"] == [1, 4]
    assert entries["model_fp32.pte"]["val"]["agreement"] == 1.0
    source_entries = {a["file"]: a for a in base["artefacts"]}
    assert entries["model_int8.pte"]["int8_candidate"] == source_entries["model_int8.pte"]["int8_candidate"]
    assert not {"head_update", "head_written_into"} & entries["model_fp32.onnx"].keys()  # converted: < 1 s
    assert (new_bundle / "labels.txt").read_text().split() == ["cardboard", "glass", "metal", "battery"]
    for artefact in entries:  # the edge runner, unchanged
        assert classify.main(["--bundle", str(new_bundle), "--validate", "--model", artefact]) == 0

    # A device holding the old bundle takes the new one without its .tflite files (a head update of a
    # few KB each) and rebuilds them byte for byte.
    tflites = ["model_fp32.tflite", "model_int8.tflite"]
    update = tmp_path / "update"
    shutil.copytree(new_bundle, update, ignore=shutil.ignore_patterns(*tflites))
    features = model_features(run_dir)
    head_files = {name: update / entries[name]["head_update"]["file"] for name in tflites}
    assert head_files["model_fp32.tflite"].stat().st_size == 4 * 4 * (features + 1)  # 4 classes, float32
    assert head_files["model_int8.tflite"].stat().st_size == 4 * (features + 12) + 8  # int8 weight + quantization
    assert classify.main(["--bundle", str(update), "--validate", "--model", "model_fp32.tflite"]) == 1  # missing
    assert classify.main(["--bundle", str(update), "--head-update-from", str(new_bundle)]) == 2  # not its base
    assert not any((update / name).exists() for name in tflites)
    for name in tflites:
        assert classify.main(["--bundle", str(update), "--head-update-from", str(bundle), "--validate",
                              "--model", name]) == 0
        assert (update / name).read_bytes() == (new_bundle / name).read_bytes()
    for name, head_file in head_files.items():  # a damaged head file is refused, nothing written
        original = head_file.read_bytes()
        head_file.write_bytes(original[:-4] + b"\1\1\1\1")
        (update / name).unlink()
        assert classify.main(["--bundle", str(update), "--head-update-from", str(bundle)]) == 2
        assert not (update / name).exists()
        head_file.write_bytes(original)
        shutil.copy(new_bundle / name, update / name)


def model_features(run_dir: Path) -> int:
    model, _ = load_checkpoint(run_dir)
    return model.model.get_classifier().in_features


def test_second_add_embeds_only_the_new_photos(exported, tmp_path: Path) -> None:
    run = exported["run"].run_dir
    first = head.add_classes(head.load_source(run), {"battery": photos(tmp_path / "battery", 12, (200, 30, 30))},
                             out_dir=tmp_path / "runs")
    assert first.report["embeddings"]["cached"] == 0
    second = head.add_classes(head.load_source(first.run_dir),
                              {"foil": photos(tmp_path / "foil", 12, (30, 30, 200), seed=2)},
                              out_dir=tmp_path / "runs")
    assert second.report["embeddings"]["computed"] == 12  # only the new class's photos
    assert second.manifest.class_names == ["cardboard", "glass", "metal", "battery", "foil"]
    assert second.manifest.version == first.manifest.version + 1
    assert backbone_sha256(second.model.model) == backbone_sha256(first.model.model)


def test_fit_head_keeps_known_rows_fits_a_new_one_and_restores_threads() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    labels = np.repeat(np.arange(3), 30)
    features = (centres[labels] + rng.normal(0, 0.5, (90, 8))).astype(np.float32)
    # A prior head that knows classes 0 and 1 (its rows 1 and 0: the order may change); 2 is new.
    prior_w = np.stack([centres[1], centres[0]]).astype(np.float32)
    prior_b = np.zeros(2, dtype=np.float32)
    threads = torch.get_num_threads()
    weight, bias = head.fit_head(features, labels, 3, (prior_w, prior_b, np.array([1, 0, -1])))
    assert torch.get_num_threads() == threads  # it fits on one thread, then gives them back
    assert ((torch.from_numpy(features) @ weight.T + bias).argmax(1).numpy() == labels).mean() == 1.0
    # Known rows stay near their prior (the anchor), the new row is what moved.
    assert torch.nn.functional.cosine_similarity(weight[0], torch.from_numpy(prior_w[1]), dim=0) > 0.9
    assert torch.nn.functional.cosine_similarity(weight[1], torch.from_numpy(prior_w[0]), dim=0) > 0.9


def test_phase_seconds_are_each_phase_alone(exported, tmp_path: Path, monkeypatch) -> None:
    """``evaluate_save`` once included the fit; a slow fit shows up in ``fit_head`` only."""
    import time

    fit = head.fit_head

    def slow_fit(*args, **kwargs):
        time.sleep(1.0)
        return fit(*args, **kwargs)

    monkeypatch.setattr(head, "fit_head", slow_fit)
    battery = photos(tmp_path / "battery", 12, (200, 30, 30))
    result = head.add_classes(head.load_source(exported["run"].run_dir), {"battery": battery},
                              out_dir=tmp_path / "runs")
    seconds = result.report["seconds"]
    assert seconds["fit_head"] >= 1.0
    assert seconds["evaluate_save"] < seconds["fit_head"]


def test_export_warms_the_cache_so_the_first_add_embeds_only_new_photos(exported, tmp_path: Path,
                                                                        monkeypatch) -> None:
    monkeypatch.setenv("TRASHSORT_CACHE", str(exported["cache"]))  # the cache the export used
    decoded: list[str] = []  # every photo decoded from here on
    real_decode = data_mod.decode_split

    def spy(samples, *args, **kwargs):
        decoded.extend(str(s.path) for s in samples)
        return real_decode(samples, *args, **kwargs)

    monkeypatch.setattr(data_mod, "decode_split", spy)
    battery = photos(tmp_path / "battery", 12, (200, 30, 30))
    result = head.add_classes(head.load_source(exported["run"].run_dir), {"battery": battery},
                              out_dir=tmp_path / "runs")
    assert result.report["embeddings"]["computed"] == 12
    base_photos = len(exported["run"].manifest.class_names) * 24  # the fixture's data: 24 per class
    assert result.report["embeddings"]["cached"] == base_photos
    # Only the new photos were decoded: the cached ones are not even opened.
    assert sorted(decoded) == sorted(str(p) for p in battery.iterdir())

    # Its export decodes val (the gate) and the calibration photos of train, not the whole train split.
    decoded.clear()
    export_run(result.run_dir, calibration_count=8, out_dir=tmp_path / "dist", artefacts=select("onnx-fp32"),
               progress=False)
    val = {str(s.path) for s in result.folder.split("val")}
    train = {str(s.path) for s in result.folder.split("train")}
    assert val <= set(decoded) and 0 < len(set(decoded) & train) <= 8 < len(train)


def test_cache_from_another_backbone_is_rebuilt_not_mixed(exported, tmp_path: Path, caplog) -> None:
    source = head.load_source(exported["run"].run_dir)
    backbone = backbone_sha256(source.model.model)
    cache = head.EmbeddingCache(backbone, source.manifest.preprocess)
    cache.vectors = {"some-photo": np.ones(4, np.float32)}
    cache.backbone = "0" * 64  # a file under this backbone's name, written by another backbone
    cache.save()
    with caplog.at_level(logging.WARNING):
        reopened = head.EmbeddingCache(backbone, source.manifest.preprocess)
    assert reopened.vectors == {} and "made by another backbone; rebuilding" in caplog.text
    # A different backbone gets a different file altogether.
    assert head.EmbeddingCache("f" * 64, source.manifest.preprocess).path != reopened.path


def test_bad_input_is_refused_with_advice(exported, tmp_path: Path) -> None:
    bundle = str(exported["result"].path)
    few = photos(tmp_path / "battery", 4, (200, 30, 30))
    done = cli("add-class", "--from", bundle, "--images", str(few), "--runs", str(tmp_path / "runs"),
               "--no-export")
    assert done.exit_code == 1 and "has 4 photo(s); at least 10 are needed" in done.output

    glass = photos(tmp_path / "more" / "glass", 12, (60, 160, 90))
    done = cli("add-class", "--from", bundle, "--images", str(glass), "--runs", str(tmp_path / "runs"),
               "--no-export")
    assert done.exit_code == 1 and "class 'glass' already exists (id 1): use --replace" in done.output
    done = cli("add-class", "--from", bundle, "--images", str(glass), "--replace", "--runs",
               str(tmp_path / "runs"), "--no-export")
    assert done.exit_code == 0, done.output
    replaced = read_manifest(tmp_path / "runs" / f"{read_manifest(bundle)['name']}-v2")
    assert [c["name"] for c in replaced["classes"]] == ["cardboard", "glass", "metal"]

    done = cli("add-class", "--from", str(tmp_path), "--images", str(glass), "--no-export")
    assert done.exit_code == 1 and "not a run folder" in done.output


def test_duplicate_photos_warn(exported, tmp_path: Path, caplog) -> None:
    battery = photos(tmp_path / "battery", 12, (200, 30, 30))
    existing = next((exported["root"] / "data" / "metal").glob("*.jpg"))
    (battery / "copy.jpg").write_bytes(existing.read_bytes())
    with caplog.at_level(logging.WARNING):
        head.add_classes(head.load_source(exported["run"].run_dir), {"battery": battery},
                         out_dir=tmp_path / "runs")
    assert f"copy.jpg = {existing}" in caplog.text and "1 new photo(s) duplicate" in caplog.text


def test_remove_and_rename(exported, tmp_path: Path) -> None:
    bundle = exported["result"].path
    done = cli("remove-class", "--from", str(exported["run"].run_dir), "metal", "--runs", str(tmp_path / "runs"),
               "--no-export")
    assert done.exit_code == 0, done.output
    removed = read_manifest(tmp_path / "runs" / f"{read_manifest(bundle)['name']}-v2")
    assert [(c["id"], c["name"]) for c in removed["classes"]] == [(0, "cardboard"), (1, "glass")]
    run_v2 = tmp_path / "runs" / f"{read_manifest(bundle)['name']}-v2"
    done = cli("rename-class", "--from", str(run_v2), "glass", "jars")
    assert done.exit_code == 0, done.output
    assert [c["name"] for c in read_manifest(run_v2)["classes"]] == ["cardboard", "jars"]
    assert [c["name"] for c in json.loads((run_v2 / "classes.json").read_text())] == ["cardboard", "jars"]
    done = cli("retrain-head", "--from", str(run_v2), "--runs", str(tmp_path / "runs"), "--no-export")
    assert done.exit_code == 0, done.output
    renamed_version = read_manifest(run_v2)["version"]  # the rename was a new manifest version
    retrained = read_manifest(tmp_path / "runs" / f"{read_manifest(bundle)['name']}-v{renamed_version + 1}")
    assert retrained["history"][-1]["change"] == "retrained the head on the current photos (head only)"
    assert [c["name"] for c in retrained["classes"]] == ["cardboard", "jars"]

    done = cli("remove-class", "--from", str(bundle), "plastic", "--no-export")
    assert done.exit_code == 1 and "no class named 'plastic'" in done.output

    done = cli("rename-class", "--from", str(bundle), "glass", "bottles", "--out", str(tmp_path / "dist"))
    assert done.exit_code == 0, done.output
    base, renamed_path = read_manifest(bundle), tmp_path / "dist" / f"{read_manifest(bundle)['name']}-v2"
    renamed = verify(renamed_path)
    assert [c["name"] for c in renamed["classes"]] == ["cardboard", "bottles", "metal"]
    assert [a["sha256"] for a in renamed["artefacts"]] == [a["sha256"] for a in base["artefacts"]]
    assert (renamed_path / "labels.txt").read_text().split() == ["cardboard", "bottles", "metal"]
    assert classify.main(["--bundle", str(renamed_path), "--validate", "--model", "model_fp32.onnx"]) == 0
    done = cli("rename-class", "--from", str(bundle), "glass", "metal", "--out", str(tmp_path / "dist2"))
    assert done.exit_code == 1 and "class 'metal' already exists" in done.output


def test_head_files_round_trip_and_a_wrong_size_is_refused(tmp_path: Path) -> None:
    """What a device reads from a head file is what the pipeline wrote: fp32 (weight, bias) and INT8
    (int8 weight, int32 bias and their quantization); a file of another size names itself."""
    from edge.bundle import BundleInvalid
    from edge.head import Quantization, head_bytes, read_head

    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    path = tmp_path / "head_fp32.bin"
    path.write_bytes(head_bytes(weight, bias))
    back_weight, back_bias, quantization = read_head(path, [3, 5])
    np.testing.assert_array_equal(back_weight, weight)
    np.testing.assert_array_equal(back_bias, bias)
    assert quantization is None

    weight_q = rng.integers(-127, 128, (3, 5)).astype(np.int8)
    bias_q = rng.integers(-1000, 1000, 3).astype(np.int32)
    quantized = Quantization(np.float32([0.1, 0.2, 0.3]), np.float32([1e-3, 2e-3, 3e-3]), 0.05, -7)
    path = tmp_path / "head_int8.bin"
    path.write_bytes(head_bytes(weight_q, bias_q, quantized))
    back_weight, back_bias, back = read_head(path, [3, 5], "int8")
    np.testing.assert_array_equal(back_weight, weight_q)
    np.testing.assert_array_equal(back_bias, bias_q)
    np.testing.assert_array_equal(back.weight_scale, quantized.weight_scale)
    np.testing.assert_array_equal(back.bias_scale, quantized.bias_scale)
    assert (back.output_scale, back.output_zero_point) == (np.float32(0.05), -7)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BundleInvalid, match="head_int8.bin: 58 bytes, a int8 head"):
        read_head(path, [3, 5], "int8")
