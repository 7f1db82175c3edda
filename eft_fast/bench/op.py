"""Op benchmark: the fused eft_sample against the eager torch composition and the memory floor.

    eft-fast bench --op [--device cpu|cuda] [--quick] [--out DIR]

For each (B, V, dtype, weight_top_p) it times, in the same run and on the same inputs:
  * eft_sample on each backend available for the device (cpu; cuda and triton on GPUs),
  * the eager composition users write today (eft_fast.baselines.eager_eft_sample),
  * the memory floor: the bytes of the three logit rows read once, over the copy
    bandwidth measured in this run.
It prints a table and writes JSON.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import _extension
from ..baselines import eager_eft_sample
from ..ops import eft_sample

FULL_GRID = dict(batch=(1, 8, 64, 256), vocab=(32000, 128256, 151936), dtype=("float32", "bfloat16"),
                 weight_top_p=(1.0, 0.9))
QUICK_GRID = dict(batch=(1, 64), vocab=(32000, 128256), dtype=("float32",), weight_top_p=(1.0, 0.9))


@dataclass
class OpResult:
    device: str
    batch: int
    vocab: int
    dtype: str
    weight_top_p: float
    eager_ms: float
    floor_ms: float
    backend_ms: dict

    def speedup(self, backend: str) -> float:
        return self.eager_ms / self.backend_ms[backend]

    def over_floor(self, backend: str) -> float:
        return self.backend_ms[backend] / self.floor_ms


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, *, min_time_s: float = 0.3, max_iters: int = 200) -> float:
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < min_time_s and len(samples) < max_iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth_gbs(device: str, nbytes: int = 256 << 20) -> float:
    """Bytes moved (read + write) per second by a large tensor copy, in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def backends_for(device: str) -> list[str]:
    if device == "cuda":
        names = ["cuda"] if _extension.has_backend("cuda") else []
        try:
            import triton  # noqa: F401

            names.append("triton")
        except ImportError:
            pass
        return names
    return ["cpu"] if _extension.has_backend("cpu") else ["torch"]


def run_op_benchmark(device: str = "cpu", quick: bool = False, progress=None) -> tuple[list[OpResult], float]:
    """Run the grid; returns (results, copy bandwidth in GB/s)."""
    grid = QUICK_GRID if quick else FULL_GRID
    bandwidth = copy_bandwidth_gbs(device)
    backends = backends_for(device)
    results = []
    cases = list(itertools.product(grid["batch"], grid["vocab"], grid["dtype"], grid["weight_top_p"]))
    for batch, vocab, dtype_name, wtp in cases:
        dtype = getattr(torch, dtype_name)
        logits = [(torch.randn(batch, vocab, device=device) * 4).to(dtype) for _ in range(3)]
        seeds = torch.randint(0, 2**62, (batch,), device=device)
        positions = torch.randint(0, 4096, (batch,), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        eager = time_ms(lambda: eager_eft_sample(*logits, weight_top_p=wtp, generator=gen), device)
        floor = 3 * batch * vocab * logits[0].element_size() / (bandwidth * 1e9) * 1e3
        per_backend = {}
        for backend in backends:
            per_backend[backend] = time_ms(
                lambda: eft_sample(*logits, seeds, positions, weight_top_p=wtp, backend=backend), device)
        results.append(OpResult(device, batch, vocab, dtype_name, wtp, eager, floor, per_backend))
        if progress is not None:
            progress(results[-1])
    return results, bandwidth


def format_table(results: list[OpResult]) -> str:
    backends = sorted({b for r in results for b in r.backend_ms})
    header = ["B", "V", "dtype", "w_top_p", "eager ms", "floor ms"]
    for b in backends:
        header += [f"{b} ms", f"{b} vs eager", f"{b} / floor"]
    rows = [header]
    for r in results:
        row = [str(r.batch), str(r.vocab), r.dtype, f"{r.weight_top_p:g}", f"{r.eager_ms:.2f}", f"{r.floor_ms:.2f}"]
        for b in backends:
            row += [f"{r.backend_ms[b]:.2f}", f"{r.speedup(b):.1f}x", f"{r.over_floor(b):.1f}x"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(results: list[OpResult], bandwidth: float, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "op_bench.json"
    payload = {
        "copy_bandwidth_gbs": bandwidth,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(0) if results and results[0].device == "cuda" else "cpu",
        "results": [asdict(r) | {"speedup_vs_eager": {b: r.speedup(b) for b in r.backend_ms},
                                 "over_floor": {b: r.over_floor(b) for b in r.backend_ms}} for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))
    return path
