"""On-device validation: prove, on the machine that will run it, that an artefact is the one that
was exported and behaves as it did at export.

1. every artefact's bytes and sha256 against the manifest (nothing runs if one differs);
2. the artefact's declared input/output tensors against the manifest (contract and class count);
3. the bundle's golden photos through this device's preprocessing: each input tensor must hash to
   what the pipeline produced at export (identical bytes, not merely close);
4. the golden photos through the artefact: top-1 agreement and largest probability difference
   against the probabilities recorded at export, within the manifest's tolerance;
5. latency: warm-up, then at least 50 batch-1 runs (median, p90).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import artefact_problems, input_contract_problems, read_manifest
from edge.preprocess import ImageDecodeError, load_rgb, model_input
from edge.runtimes import machine, measure_latency, open_runner, softmax


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ValidationReport:
    bundle: str
    artefact: str
    machine: str
    checks: list[Check] = field(default_factory=list)
    golden: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def text(self) -> str:
        lines = [f"validate {self.artefact} in {self.bundle} on {self.machine}"]
        lines += [f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in self.checks]
        if self.latency:
            lat = self.latency
            lines.append(f"  latency: median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms "
                         f"({lat['runs']} runs, threads: {lat['threads'] or 'runtime default'})")
        lines.append("RESULT: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)


def validate_bundle(bundle: str | Path, entry: dict[str, Any], threads: int | None = None,
                    latency_runs: int = 50) -> ValidationReport:
    """Validate one artefact (a manifest entry) of ``bundle``; see the module docstring."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    report = ValidationReport(str(bundle), entry["file"], machine())
    problems = artefact_problems(bundle, manifest)
    if not report.add("sha256", not problems, "; ".join(problems) or
                      f"{len(manifest['artefacts'])} artefact(s) match the manifest"):
        return report  # never run a damaged or replaced artefact

    num_classes = len(manifest["classes"])
    runner = open_runner(entry["format"], bundle / entry["file"], threads)
    io = runner.io
    problems = input_contract_problems(io, manifest["preprocess"]["size"], num_classes)
    problems += [f"{side} {a['name']} declared {a['shape']} {a['dtype']}, manifest says {m['shape']} {m['dtype']}"
                 for side in ("inputs", "outputs") for a, m in zip(io[side], entry[side])
                 if [int(s) for s in a["shape"]] != [int(s) for s in m["shape"]] or a["dtype"] != m["dtype"]]
    if not report.add("tensors", not problems, "; ".join(problems) or
                      f"input {io['inputs'][0]['shape']} {io['inputs'][0]['dtype']}, "
                      f"output {io['outputs'][0]['shape']} = {num_classes} classes"):
        return report

    golden = _golden_inputs(bundle, manifest, report)
    if golden is None:
        return report
    inputs, recorded = golden
    expected = np.asarray(recorded["artefacts"].get(entry["file"], []), dtype=np.float64)
    if expected.shape != (len(inputs), num_classes):
        report.add("golden outputs", False, f"golden/expected.json has no {len(inputs)}x{num_classes} "
                                            f"probabilities for {entry['file']}")
        return report
    probs = softmax(runner(inputs)).astype(np.float64)
    agreement = float((probs.argmax(1) == expected.argmax(1)).mean())
    max_diff = float(np.abs(probs - expected).max())
    tolerance = entry.get("golden_tolerance", {"min_agreement": 1.0, "max_prob_diff": 0.01})
    report.golden = {"count": len(inputs), "agreement": agreement, "max_prob_diff": max_diff,
                     "tolerance": tolerance}
    ok = agreement >= tolerance["min_agreement"] and max_diff <= tolerance["max_prob_diff"]
    report.add("golden outputs", ok,
               f"top-1 agrees on {agreement:.2%} of {len(inputs)} (need {tolerance['min_agreement']:.0%}), "
               f"max prob diff {max_diff:.2e} (allowed {tolerance['max_prob_diff']:.0e})")

    latency = measure_latency(runner, inputs[0], warmup=5, runs=max(50, latency_runs))
    report.latency = {**latency, "threads": threads or 0}
    return report


def _golden_inputs(bundle: Path, manifest: dict[str, Any],
                   report: ValidationReport) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The golden photos through this device's preprocessing, checked byte for byte, and what the
    export recorded for them (None on failure)."""
    try:
        expected = json.loads((bundle / "golden" / "expected.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        report.add("golden inputs", False, f"{bundle / 'golden' / 'expected.json'}: unreadable ({e})")
        return None
    inputs, mismatched = [], []
    for item in expected["images"]:
        try:
            tensor = model_input(load_rgb(bundle / "golden" / item["file"]), manifest["preprocess"])
        except ImageDecodeError as e:
            report.add("golden inputs", False, str(e))
            return None
        if hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest() != item["input_sha256"]:
            mismatched.append(item["file"])
        inputs.append(tensor)
    ok = bool(inputs) and not mismatched
    report.add("golden inputs", ok, f"{len(inputs)} photos preprocess to the exported tensors byte for byte"
               if ok else f"preprocessing differs from the export's on {mismatched or 'no photos'}")
    return (np.stack(inputs), expected) if ok else None
