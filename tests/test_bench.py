"""`trashsort bench`: eager and every artefact of a bundle timed in turns, and its report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.runtimes import measure_latencies
from pipeline import bench as bench_mod
from pipeline import train as train_mod


def test_runners_take_turns() -> None:
    """Each runner is warmed up, then they alternate round by round: an order effect (a machine
    warming up) falls on all of them alike."""
    calls: list[str] = []

    def runner(name: str):
        return lambda batch: calls.append(name)

    latencies = measure_latencies([runner("a"), runner("b")], np.zeros((2, 2, 3), np.uint8), warmup=1, runs=4,
                                  rounds=2)
    assert calls == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]
    assert [lat["runs"] for lat in latencies] == [4, 4]
    assert all(lat["median_ms"] >= 0 and lat["p90_ms"] >= lat["median_ms"] for lat in latencies)


def test_bench_times_eager_and_every_artefact(exported, tmp_path: Path) -> None:
    bundle = exported["result"].path
    model, _ = train_mod.load_checkpoint(exported["run"].run_dir)
    rows = bench_mod.run_bench(bundle, model, 1000, runs=5, warmup=1)
    files = [a["file"] for a in exported["result"].manifest.artefacts]
    assert [r["name"] for r in rows] == ["PyTorch eager (fp32)", *files]
    for row in rows:
        assert row["latency_1"]["runs"] == 5 and row["latency_1"]["median_ms"] > 0
    path = bench_mod.write_bench(rows, tmp_path, runs=5)
    table = path.read_text()
    assert all(f"| {name} |" in table for name in files) and "| 1.0x |" in table
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
