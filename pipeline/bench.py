"""Benchmark a bundle: PyTorch eager and every artefact in its own runtime, in one run.

Batch-1 latency with one thread and with all threads (median and p90 over ``runs`` after warm-up,
the runners taking turns),
size on disk and val top-1 (from the export's gate), written as a markdown table with ratios to
eager, and a PNG plot of size vs latency vs accuracy.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.bundle import verify
from edge.runtimes import measure_latencies
from pipeline.export import driver
from pipeline.manifest import write_bytes_atomic


class EagerRunner:
    """The PyTorch contract model behind the same call as the artefact runners."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.array(images))).numpy()


ROUNDS = 5  # the runners take turns (edge/runtimes.py: measure_latencies)


def run_bench(bundle: str | Path, model: torch.nn.Module, checkpoint_bytes: int, runs: int = 100,
              warmup: int = 10) -> list[dict[str, Any]]:
    """One row per runner: name, bytes, val top-1, latency (1 thread, all threads). Per thread
    count, eager and every artefact are timed in turns (``ROUNDS``), not one after the other."""
    manifest = verify(bundle)
    height, width = manifest["preprocess"]["size"]
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    all_threads = os.cpu_count() or 1
    rows = [{"name": "PyTorch eager (fp32)", "bytes": checkpoint_bytes,
             "top1": manifest["metrics"]["pytorch_val"]["top1"]}]
    rows += [{"name": e["file"], "bytes": e["bytes"], "top1": e["val"]["top1"]} for e in manifest["artefacts"]]
    for threads in (1, all_threads):  # thread counts are process-wide in torch and ExecuTorch: one at a time
        torch.set_num_threads(threads)
        runners = [EagerRunner(model)] + [driver(e["format"]).Runner(Path(bundle) / e["file"], threads=threads)
                                          for e in manifest["artefacts"]]
        for row, latency in zip(rows, measure_latencies(runners, image, warmup, runs, ROUNDS)):
            row[f"latency_{threads}"] = latency
    torch.set_num_threads(all_threads)
    return rows


def bench_markdown(rows: list[dict[str, Any]], runs: int) -> str:
    threads = os.cpu_count() or 1
    base1, baseN = rows[0]["latency_1"]["median_ms"], rows[0][f"latency_{threads}"]["median_ms"]
    lines = [f"| runner | size (MB) | val top-1 | 1 thread: median / p90 ms | vs eager | "
             f"{threads} threads: median / p90 ms | vs eager |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        one, many = r["latency_1"], r[f"latency_{threads}"]
        lines.append(f"| {r['name']} | {r['bytes'] / 1e6:.2f} | {r['top1']:.4f} | "
                     f"{one['median_ms']:.2f} / {one['p90_ms']:.2f} | {base1 / one['median_ms']:.1f}x | "
                     f"{many['median_ms']:.2f} / {many['p90_ms']:.2f} | {baseN / many['median_ms']:.1f}x |")
    lines.append("")
    lines.append(f"Batch 1, {runs} timed runs after warm-up, the runners taking turns in {ROUNDS} rounds, "
                 f"on this machine ({threads} cores).")
    return "\n".join(lines) + "\n"


def bench_png(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["latency_1"]["median_ms"], r["top1"]
        ax.scatter(x, y, s=max(20.0, r["bytes"] / 2e4), alpha=0.6)
        ax.annotate(f"{r['name']} ({r['bytes'] / 1e6:.1f} MB)", (x, y), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("latency, 1 thread, batch 1 (ms, median)")
    ax.set_ylabel("val top-1")
    ax.set_title("size (marker area) vs latency vs accuracy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_bench(rows: list[dict[str, Any]], out_dir: str | Path, runs: int) -> Path:
    out_dir = Path(out_dir)
    table = bench_markdown(rows, runs)
    write_bytes_atomic(out_dir / "bench.md", table.encode())
    write_bytes_atomic(out_dir / "bench.png", bench_png(rows))
    return out_dir / "bench.md"
