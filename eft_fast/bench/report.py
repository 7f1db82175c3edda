"""The engine benchmark's outputs: a table shaped like the EFT paper's Table 2 (tokens/s per
column, acceptance rates, speed-ups), the targets of the issue, a JSON file and a PNG plot."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .engine import COLUMN_ORDER, WorkloadResult
from .profile import BUCKETS

# (name, workload index, column, baseline column, minimum ratio). Columns: a key, "best_spec"
# (the fastest exact speculative column) or "best_exact" (the fastest of eft_fast EFT and the
# exact speculative columns: the engine's best lossless configuration). At batch 1 the naive
# batched loop is the naive loop (a batch of one).
TARGETS = [
    ("eft_fast EFT vs naive loop, batch 1", 0, "eft", "naive", 1.5),
    ("eft_fast EFT vs naive loop, 16 concurrent (aggregate)", 1, "eft", "naive", 5.0),
    ("speculative EFT (best exact k) vs eft_fast EFT, batch 1", 0, "best_spec", "eft", 2.0),
    ("eft_fast best exact configuration vs naive (batched) loop, batch 1", 0, "best_exact", "naive", 1.5),
    ("eft_fast EFT vs naive batched loop, 16 concurrent", 1, "eft", "naive_batched", 1.2),
    ("eft_fast best exact configuration vs naive batched loop, 16 concurrent", 1, "best_exact", "naive_batched", 1.3),
    ("eft_fast EFT vs naive batched loop, mixed lengths", 2, "eft", "naive_batched", 3.0),
    ("spec k=auto vs eft_fast EFT (k = 0), batch 1", 0, "spec_auto", "eft", 0.95),
    ("spec k=auto vs eft_fast EFT (k = 0), 16 concurrent", 1, "spec_auto", "eft", 0.95),
    ("spec k=auto vs eft_fast EFT (k = 0), mixed lengths", 2, "spec_auto", "eft", 0.95),
    ("spec k=auto vs the best fixed k, batch 1", 0, "spec_auto", "best_spec", 0.9),
]


def _column(result: WorkloadResult, key: str):
    if key == "best_spec":
        return result.columns[f"spec_k{result.best_exact_k()}"]
    if key == "best_exact":
        exact = [c for c in result.columns.values() if c.key == "eft" or c.accept == "exact"]
        return max(exact, key=lambda c: c.tokens_per_s)
    return result.columns[key]


def _available(result: WorkloadResult, key: str) -> bool:
    """Whether the workload ran the column ``key`` names (see _column)."""
    if key == "best_spec":
        return result.best_exact_k() is not None
    if key == "best_exact":
        return "eft" in result.columns
    return key in result.columns


def speedups(result: WorkloadResult, baseline: str) -> dict[str, float]:
    """tokens/s of every column over the ``baseline`` column's ({} if the workload lacks it)."""
    base = result.columns[baseline].tokens_per_s if baseline in result.columns else 0.0
    return {key: c.tokens_per_s / base for key, c in result.columns.items()} if base > 0 else {}


def evaluate_targets(results: list[WorkloadResult]) -> list[dict]:
    out = []
    for name, index, key, baseline, minimum in TARGETS:
        if index >= len(results):
            continue
        result = results[index]
        if not (_available(result, key) and _available(result, baseline)):
            continue
        column, base = _column(result, key), _column(result, baseline)
        ratio = column.tokens_per_s / base.tokens_per_s
        entry = {"target": name, "workload": result.workload.key, "column": column.key, "baseline": baseline,
                 "minimum": minimum,
                 "measured": ratio, "met": ratio >= minimum, "shortfall": max(minimum / ratio, 1.0)}
        if column.identical is not None:
            entry["identical"] = column.identical
            entry["met"] = entry["met"] and column.identical
        out.append(entry)
    return out


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                enumerate(zip(row, widths))) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_table(results: list[WorkloadResult]) -> str:
    """Tokens/s of every column per workload, with acceptance and speed-up rows ("-": the
    workload does not run that column)."""
    keys = [k for k in COLUMN_ORDER if any(k in r.columns for r in results)]
    labels = {k: next(r.columns[k].label for r in results if k in r.columns) for k in keys}
    rows = [["tokens/s"] + [labels[k] for k in keys]]

    def cells(result, text):
        return [text(result.columns[k]) if k in result.columns else "-" for k in keys]

    for result in results:
        rows.append([result.workload.name] + cells(
            result, lambda c: f"{c.tokens_per_s:.1f}" + (f" (k={c.k})" if c.key == "rejection" else "")))
        rows.append(["  acceptance"] + cells(result, lambda c: "-" if c.acceptance is None else f"{c.acceptance:.2f}"))
        for baseline, label in (("naive", "  x naive loop"), ("naive_batched", "  x naive batched"),
                                ("eft", "  x eft_fast EFT")):
            ratios = speedups(result, baseline)
            if ratios:
                rows.append([label] + cells(result, lambda c: f"{ratios[c.key]:.2f}x"))
    return _render(rows)


def format_breakdown(results: list[WorkloadResult]) -> str:
    """Share of each column's wall time per bucket (see eft_fast.bench.profile)."""
    rows = [["workload", "column", "ms/token"] + list(BUCKETS)]
    for result in results:
        for key in COLUMN_ORDER:
            if key not in result.columns:
                continue
            c = result.columns[key]
            frac = c.breakdown["fraction"]
            rows.append([result.workload.name, c.label, f"{1e3 * c.seconds / max(c.tokens, 1):.2f}"] +
                        [f"{100 * frac[b]:.0f}%" for b in BUCKETS])
    return _render(rows)


def format_targets(targets: list[dict]) -> str:
    rows = [["target", "minimum", "measured", "verdict"]]
    for t in targets:
        verdict = "met" if t["met"] else f"missed ({t['shortfall']:.2f}x short)"
        if "identical" in t:
            verdict += ", identical samples" if t["identical"] else ", samples differ"
        rows.append([t["target"], f"{t['minimum']:.2f}x", f"{t['measured']:.2f}x", verdict])
    return _render(rows)


def payload(results: list[WorkloadResult], models_description: dict, settings, *, command: str, device: str,
            dtype: str, threads: int, wall_s: float) -> dict:
    workloads = []
    for result in results:
        w = result.workload
        columns = {}
        for key in COLUMN_ORDER:
            if key not in result.columns:
                continue
            c = result.columns[key]
            columns[key] = {"label": c.label, "tokens": c.tokens, "seconds": c.seconds,
                            "cpu_seconds": c.cpu_seconds, "tokens_per_s": c.tokens_per_s,
                            "speculative_k": c.k, "accept": c.accept, "proposed_tokens": c.proposed,
                            "accepted_tokens": c.accepted, "rounds": c.rounds, "acceptance_rate": c.acceptance,
                            "identical": c.identical, "breakdown": c.breakdown}
        exact = [c for c in result.columns.values() if c.accept == "exact"]
        workloads.append({
            "key": w.key, "name": w.name, "concurrency": w.concurrency, "num_requests": len(w.prompts),
            "max_tokens": w.max_tokens, "prompt_lengths": [len(p) for p in w.prompts], "columns": columns,
            "best_k": result.best_exact_k(), "identical": all(c.identical for c in exact) if exact else None,
            "max_tokens_each": w.lengths,
            "speedup_vs_naive": speedups(result, "naive"), "speedup_vs_naive_batched": speedups(result, "naive_batched"),
            "speedup_vs_eft": speedups(result, "eft")})
    targets = evaluate_targets(results)
    return {
        "command": command, "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": dtype, "threads": threads, "torch": torch.__version__, "transformers": _version("transformers"),
        "wall_seconds": wall_s, "models": models_description,
        "sampling": {"temperature": settings.temperature, "weight_top_p": settings.weight_top_p,
                     "seeds": f"{settings.seed} + request index", "ignore_eos": True},
        "workloads": workloads, "identical": all(w["identical"] is not False for w in workloads), "targets": targets,
    }


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def write_json(data: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "engine_bench.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def write_plot(results: list[WorkloadResult], out_dir: Path, title: str) -> Path | None:
    """Bar charts of tokens/s per column, one panel per workload; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.8), squeeze=False)
    colors = {"tuned": "#9e9e9e", "knowledge": "#616161", "naive": "#e57373", "naive_batched": "#c62828",
              "eft": "#64b5f6", "rejection": "#ffb74d"}
    for ax, result in zip(axes[0], results):
        keys = [k for k in COLUMN_ORDER if k in result.columns]
        cols = [result.columns[k] for k in keys]
        values = [c.tokens_per_s for c in cols]
        bars = ax.bar(range(len(cols)), values, color=[colors.get(k, "#1976d2") for k in keys])
        baseline = "naive_batched" if "naive_batched" in result.columns else "naive"
        base = result.columns[baseline].tokens_per_s
        for bar, c in zip(bars, cols):
            note = f"{c.tokens_per_s / base:.1f}x" + (f"\nacc {c.acceptance:.2f}" if c.acceptance is not None else "")
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(cols)), [c.label for c in cols], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{result.workload.name} (labels: x {result.columns[baseline].label}, acceptance)", fontsize=9)
        ax.set_ylim(0, max(values) * 1.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out_dir / "engine_bench.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
