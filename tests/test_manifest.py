import json
from pathlib import Path

import pytest

from pipeline import manifest as m


def sample_manifest() -> m.Manifest:
    return m.new_manifest(
        "demo", ["cardboard", "glass", "trash"], m.Preprocess(),
        m.ModelInfo(arch="tf_mobilenetv3_small_100", preset="mobilenetv3_small"),
        streams={"cardboard": "paper-recycling"},
    )


def test_round_trip(tmp_path: Path) -> None:
    original = sample_manifest()
    original.artefacts.append({"file": "a.tflite", "format": "tflite", "precision": "int8", "sha256": "00"})
    path = tmp_path / "manifest.json"
    original.save(path)
    loaded = m.load(path)
    assert loaded == original
    assert loaded.class_names == ["cardboard", "glass", "trash"]
    assert loaded.classes[0].stream == "paper-recycling" and loaded.classes[1].stream is None
    assert loaded.preprocess.resize_shorter_to == 256
    assert json.loads(path.read_text())["schema"] == m.SCHEMA


def test_history_bumps_version() -> None:
    man = sample_manifest()
    assert man.version == 1 and len(man.history) == 1
    man.add_history("renamed trash to residual")
    assert man.version == 2 and man.history[-1].version == 2


def valid_doc() -> dict:
    return sample_manifest().to_dict()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(schema="other/9"), "schema: expected"),
        (lambda d: d.pop("name"), "name: missing"),
        (lambda d: d.update(name="  "), "name: must not be empty"),
        (lambda d: d.update(version=0), "version: must be >= 1"),
        (lambda d: d.update(version="1"), "version: expected an integer"),
        (lambda d: d.update(version=True), "version: expected an integer"),
        (lambda d: d.update(classes=[]), "at least one class"),
        (lambda d: d["classes"][1].update(id=5), "ids must be 0..N-1"),
        (lambda d: d["classes"][1].update(name="cardboard"), "duplicate names ['cardboard']"),
        (lambda d: d["classes"][0].update(stream=3), "stream: expected a string"),
        (lambda d: d["classes"][0].update(colour="red"), "unknown keys ['colour']"),
        (lambda d: d["classes"].append("glass"), "classes[3]: expected an object"),
        (lambda d: d["preprocess"].update(size=[224]), "preprocess.size"),
        (lambda d: d["preprocess"].update(crop_pct=1.5), "crop_pct: must be in (0, 1]"),
        (lambda d: d["preprocess"].update(interpolation="lanczos9"), "interpolation: expected one of"),
        (lambda d: d["preprocess"]["input"].update(layout="NCWH"), "layout: expected one of"),
        (lambda d: d["preprocess"]["input"].update(dtype="int4"), "dtype: expected one of"),
        (lambda d: d["preprocess"]["input"].update(mean=[0.5]), "mean: expected 3 numbers"),
        (lambda d: d["preprocess"]["input"].update(std=[0.5, 0, 0.5]), "std: must be positive"),
        (lambda d: d["preprocess"]["input"].pop("normalized_in_graph"), "normalized_in_graph: missing"),
        (lambda d: d["model"].pop("arch"), "model.arch: missing"),
        (lambda d: d.update(artefacts=[{"file": "x"}]), "artefacts[0].format: missing"),
        (lambda d: d.update(history=[{"version": 1}]), "history[0].change: missing"),
        (lambda d: d.update(extra=1), "unknown top-level keys ['extra']"),
    ],
)
def test_each_validation_error(tmp_path: Path, mutate, expected: str) -> None:
    doc = valid_doc()
    mutate(doc)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(m.ManifestError) as err:
        m.load(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_all_problems_reported_at_once() -> None:
    doc = valid_doc()
    doc.pop("name")
    doc["version"] = -3
    doc["preprocess"]["crop_pct"] = 0
    problems = m.validate(doc)
    assert len(problems) == 3, problems


def test_not_json_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(m.ManifestError, match="not valid JSON"):
        m.load(bad)
    with pytest.raises(m.ManifestError, match="manifest not found"):
        m.load(tmp_path / "absent.json")
    assert m.validate([1, 2]) == ["top level must be an object, got list"]


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.json"
    sample_manifest().save(path)
    before = path.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(m.os, "replace", boom)
    man = sample_manifest()
    man.name = "changed"
    with pytest.raises(OSError, match="disk full"):
        man.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_check_classes_match() -> None:
    man = sample_manifest()
    m.check_classes_match(man, ["cardboard", "glass", "trash"], "data")
    with pytest.raises(m.ManifestError, match=r"missing \['trash'\]; not in manifest \['metal'\]"):
        m.check_classes_match(man, ["cardboard", "glass", "metal"], "data")
    with pytest.raises(m.ManifestError, match="order differs"):
        m.check_classes_match(man, ["glass", "cardboard", "trash"], "data")
