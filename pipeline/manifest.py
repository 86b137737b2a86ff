"""The bundle manifest: the single source of truth for classes, preprocessing and artefacts.

A manifest is a versioned JSON document (schema ``trashsort.manifest/1``). Everything that needs
to know which classes exist, in which order, or how a photo becomes an input tensor reads it.
Loading validates the whole document and reports every problem at once; saving is atomic.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.preprocess import shorter_side

SCHEMA = "trashsort.manifest/1"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("uint8", "float32")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every problem found."""


@dataclass
class ClassInfo:
    id: int
    name: str
    stream: str | None = None  # recycling stream, e.g. "paper-recycling"


@dataclass
class InputSpec:
    """What the model's input tensor looks like (the input contract)."""

    layout: str = "NHWC"
    dtype: str = "uint8"
    normalized_in_graph: bool = True
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class Preprocess:
    """How a photo becomes an input: resize shorter side to round(H / crop_pct), center-crop HxW."""

    size: list[int] = field(default_factory=lambda: [224, 224])
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    input: InputSpec = field(default_factory=InputSpec)

    @property
    def resize_shorter_to(self) -> int:
        return shorter_side(self.size, self.crop_pct)


@dataclass
class ModelInfo:
    arch: str
    preset: str | None = None
    weights_source: str = "none"  # "hub:<tag>", "file:<path>" or "none"
    weights_sha256: str | None = None
    checkpoint_sha256: str | None = None
    backbone_sha256: str | None = None  # everything but the classifier head: head retraining keeps it
    checkpoint: str | None = None  # the run checkpoint a bundle was exported from (for head retraining)


@dataclass
class HistoryEntry:
    version: int
    change: str
    date: str


@dataclass
class Manifest:
    name: str
    classes: list[ClassInfo]
    preprocess: Preprocess
    model: ModelInfo
    version: int = 1
    artefacts: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    schema: str = SCHEMA

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def add_history(self, change: str, bump: bool = True) -> None:
        """Record a change; ``bump`` starts a new manifest version first."""
        if bump and self.history:
            self.version += 1
        self.history.append(HistoryEntry(self.version, change, _now()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Keep the schema tag first so a reader sees what it is looking at.
        return {"schema": data.pop("schema"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        problems = validate(data)
        if problems:
            raise ManifestError(f"{source}: invalid manifest:\n  - " + "\n  - ".join(problems))
        pre = dict(data["preprocess"])
        pre["input"] = InputSpec(**pre.get("input", {}))
        return cls(
            schema=data["schema"],
            name=data["name"],
            version=data["version"],
            classes=[ClassInfo(**c) for c in data["classes"]],
            preprocess=Preprocess(**pre),
            model=ModelInfo(**data["model"]),
            artefacts=list(data.get("artefacts", [])),
            metrics=dict(data.get("metrics", {})),
            history=[HistoryEntry(**h) for h in data.get("history", [])],
        )

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())


def new_manifest(
    name: str, class_names: list[str], preprocess: Preprocess, model: ModelInfo,
    streams: dict[str, str] | None = None,
) -> Manifest:
    streams = streams or {}
    classes = [ClassInfo(i, n, streams.get(n)) for i, n in enumerate(class_names)]
    manifest = Manifest(name=name, classes=classes, preprocess=preprocess, model=model)
    manifest.add_history(f"created with {len(classes)} classes", bump=False)
    return manifest


def load(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(data, source=str(path))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename: never a half-written file."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; bundles and runs are meant to be read by others
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def validate(data: Any) -> list[str]:
    """Every problem in a manifest document, as readable lines (empty when valid)."""
    if not isinstance(data, dict):
        return [f"top level must be an object, got {type(data).__name__}"]
    problems: list[str] = []

    def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if key not in obj:
            problems.append(f"{where}{key}: missing")
            return None
        value = obj[key]
        # bool is an int in Python; do not let True pass as a number.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            problems.append(f"{where}{key}: expected {_kind_name(kind)}, got {value!r}")
            return None
        return value

    schema = need(data, "schema", str, "")
    if schema is not None and schema != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {schema!r}")
    name = need(data, "name", str, "")
    if name is not None and not name.strip():
        problems.append("name: must not be empty")
    version = need(data, "version", int, "")
    if version is not None and version < 1:
        problems.append(f"version: must be >= 1, got {version}")

    classes = need(data, "classes", list, "")
    if classes is not None:
        if not classes:
            problems.append("classes: must list at least one class")
        names: list[str] = []
        for i, c in enumerate(classes):
            where = f"classes[{i}]."
            if not isinstance(c, dict):
                problems.append(f"classes[{i}]: expected an object, got {c!r}")
                continue
            cid = need(c, "id", int, where)
            if cid is not None and cid != i:
                problems.append(f"{where}id: ids must be 0..N-1 in order, expected {i}, got {cid}")
            cname = need(c, "name", str, where)
            if cname is not None:
                if not cname.strip():
                    problems.append(f"{where}name: must not be empty")
                names.append(cname)
            if c.get("stream") is not None and not isinstance(c["stream"], str):
                problems.append(f"{where}stream: expected a string or null, got {c['stream']!r}")
            unknown = set(c) - {"id", "name", "stream"}
            if unknown:
                problems.append(f"{where}: unknown keys {sorted(unknown)}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"classes: duplicate names {dupes}")

    pre = need(data, "preprocess", dict, "")
    if pre is not None:
        size = need(pre, "size", list, "preprocess.")
        if size is not None and (
            len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            problems.append(f"preprocess.size: expected [height, width] positive integers, got {size!r}")
        crop = need(pre, "crop_pct", (int, float), "preprocess.")
        if crop is not None and not 0 < crop <= 1:
            problems.append(f"preprocess.crop_pct: must be in (0, 1], got {crop}")
        interp = need(pre, "interpolation", str, "preprocess.")
        if interp is not None and interp not in INTERPOLATIONS:
            problems.append(f"preprocess.interpolation: expected one of {list(INTERPOLATIONS)}, got {interp!r}")
        spec = need(pre, "input", dict, "preprocess.")
        if spec is not None:
            where = "preprocess.input."
            layout = need(spec, "layout", str, where)
            if layout is not None and layout not in LAYOUTS:
                problems.append(f"{where}layout: expected one of {list(LAYOUTS)}, got {layout!r}")
            dtype = need(spec, "dtype", str, where)
            if dtype is not None and dtype not in DTYPES:
                problems.append(f"{where}dtype: expected one of {list(DTYPES)}, got {dtype!r}")
            need(spec, "normalized_in_graph", bool, where)
            for key in ("mean", "std"):
                values = need(spec, key, list, where)
                if values is not None and (
                    len(values) != 3 or not all(isinstance(v, (int, float)) for v in values)
                ):
                    problems.append(f"{where}{key}: expected 3 numbers, got {values!r}")
                elif values is not None and key == "std" and any(v <= 0 for v in values):
                    problems.append(f"{where}std: must be positive, got {values!r}")
        unknown = set(pre) - {"size", "crop_pct", "interpolation", "input"}
        if unknown:
            problems.append(f"preprocess: unknown keys {sorted(unknown)}")

    model = need(data, "model", dict, "")
    if model is not None:
        need(model, "arch", str, "model.")
        unknown = set(model) - set(ModelInfo.__dataclass_fields__)
        if unknown:
            problems.append(f"model: unknown keys {sorted(unknown)}")

    artefacts = data.get("artefacts", [])
    if not isinstance(artefacts, list):
        problems.append(f"artefacts: expected a list, got {artefacts!r}")
    else:
        for i, a in enumerate(artefacts):
            if not isinstance(a, dict):
                problems.append(f"artefacts[{i}]: expected an object, got {a!r}")
                continue
            for key in ("file", "format", "precision", "sha256"):
                need(a, key, str, f"artefacts[{i}].")
    if not isinstance(data.get("metrics", {}), dict):
        problems.append("metrics: expected an object")

    history = data.get("history", [])
    if not isinstance(history, list):
        problems.append(f"history: expected a list, got {history!r}")
    else:
        for i, h in enumerate(history):
            if not isinstance(h, dict):
                problems.append(f"history[{i}]: expected an object, got {h!r}")
                continue
            need(h, "version", int, f"history[{i}].")
            need(h, "change", str, f"history[{i}].")
            need(h, "date", str, f"history[{i}].")

    unknown = set(data) - set(Manifest.__dataclass_fields__)
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)}")
    return problems


def check_classes_match(manifest: Manifest, class_names: list[str], source: str) -> None:
    """Raise when a dataset's classes are not the manifest's (same names, same order)."""
    if class_names != manifest.class_names:
        missing = [c for c in manifest.class_names if c not in class_names]
        extra = [c for c in class_names if c not in manifest.class_names]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"not in manifest {extra}")
        if not detail:
            detail.append(f"order differs: {class_names}")
        raise ManifestError(
            f"{source}: classes do not match the manifest {manifest.class_names}: " + "; ".join(detail)
        )


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
             "dict": "an object", "bool": "true/false"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in _as_tuple(kind))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
