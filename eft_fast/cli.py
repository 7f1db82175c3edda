"""The `eft-fast` command line: info, sample (a demo of the fused op), generate, serve, bench, check."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cli_generate import add_generate_parser
from .serve.cli import add_serve_parser


def _cmd_info(args) -> int:
    from .info import info

    details = info()
    if args.json:
        print(json.dumps(details, indent=2))
    else:
        width = max(map(len, details))
        for key, value in details.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def _cmd_sample(args) -> int:
    """Sample from random logits with every available backend and show that they agree."""
    from . import eft_sample
    from .info import info

    device = args.device
    backends = [b for b in info()["available_backends"] if (b in ("torch",) or (b == "cpu") == (device == "cpu"))]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    logits = [(torch.randn(args.batch, args.vocab, generator=gen) * 4).to(device) for _ in range(3)]
    seeds = torch.arange(args.batch, device=device) + args.seed
    positions = torch.zeros(args.batch, dtype=torch.int64, device=device)
    print(f"EFT up-scaling sample: B={args.batch}, V={args.vocab}, T={args.temperature}, "
          f"weight_top_p={args.weight_top_p}, device={device}")
    for backend in backends:
        tokens, logprob = eft_sample(*logits, seeds, positions, temperature=args.temperature,
                                     weight_top_p=args.weight_top_p, backend=backend)
        print(f"  {backend:>6}: tokens {tokens.tolist()}  logprob {[round(x, 4) for x in logprob.tolist()]}")
    return 0


def _cmd_bench(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("eft-fast bench: --device cuda needs a GPU", file=sys.stderr)
        return 2
    if args.tensor_parallel_size < 1:
        print(f"eft-fast bench: --tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}", file=sys.stderr)
        return 2
    if args.tensor_parallel_size > 1 and args.op:
        print("eft-fast bench: --tensor-parallel-size applies to the engine benchmark, not to --op", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"eft-fast bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.host_overhead:
        if args.op or args.tensor_parallel_size > 1 or any(getattr(args, n) is not None for n in
                                                             ("knowledge", "tuned", "reference", "dtype")):
            print("eft-fast bench: --host-overhead runs its own tiny models alone (no --op, model options, "
                  "--dtype or --tensor-parallel-size)", file=sys.stderr)
            return 2
        return _cmd_bench_host_overhead(args)
    if args.op:
        engine_only = [f"--{name}" for name in ("knowledge", "tuned", "reference", "dtype")
                       if getattr(args, name) is not None]
        if engine_only:
            print(f"eft-fast bench: {', '.join(engine_only)} apply to the engine benchmark, not to --op",
                  file=sys.stderr)
            return 2
        return _cmd_bench_op(args)
    return _cmd_bench_engine(args)


def _cmd_bench_op(args) -> int:
    from .bench.op import format_table, run_op_benchmark, write_json

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"op benchmark on {args.device} ({torch.get_num_threads()} threads)", flush=True)
    results, bandwidth = run_op_benchmark(
        args.device, quick=args.quick,
        progress=lambda r: print(f"  B={r.batch} V={r.vocab} {r.dtype} w_top_p={r.weight_top_p:g} done", flush=True))
    print(f"copy bandwidth: {bandwidth:.1f} GB/s")
    print(format_table(results))
    path = write_json(results, bandwidth, Path(args.out))
    print(f"wrote {path}")
    return 0


def _cmd_bench_host_overhead(args) -> int:
    """The engine's host work per decode step on tiny models (eft_fast.bench.host_overhead)."""
    import json

    from .bench.host_overhead import format_table, payload, run_host_overhead

    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else torch.get_num_threads())
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print(f"host overhead per decode step on {args.device} ({threads} threads)", flush=True)
        rows = run_host_overhead(args.device, quick=args.quick,
                                 progress=None if args.no_progress else
                                 lambda r: print(f"  {r.label}, batch {r.batch}: host {r.host_ms:.2f} ms/step",
                                                 flush=True))
    finally:
        torch.set_num_threads(saved_threads)
    print(format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "host_overhead.json"
    path.write_text(json.dumps(payload(rows, command=args.command_line, device=args.device, threads=threads),
                               indent=2))
    print(f"wrote {path}")
    return 0


def _cmd_bench_engine(args) -> int:
    """Tokens/s of every column (see eft_fast.bench.engine) on the synthetic family or real models."""
    import time
    from dataclasses import replace

    from .bench import report
    from .bench.engine import run_engine_benchmark
    from .bench.workloads import QUICK_SETTINGS, BenchSettings, real_models, synthetic_models
    from .engine.loading import parse_dtype

    given = [args.knowledge, args.tuned, args.reference]
    if any(given) and not all(given):
        print("eft-fast bench: real models need all of --knowledge, --tuned and --reference", file=sys.stderr)
        return 2
    real = all(given)
    dtype = parse_dtype(args.dtype or ("bfloat16" if real and args.device == "cuda" else "float32"))
    # One intra-op thread by default on CPU: the models are small, and on a shared machine a
    # second OpenMP thread spends its time waiting for a busy core. Every column runs with
    # the same setting, and the JSON records it.
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else torch.get_num_threads())
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        if real:
            print(f"loading {args.knowledge}, {args.tuned}, {args.reference}", flush=True)
            models = real_models(args.knowledge, args.tuned, args.reference, dtype, args.device)
        else:
            models = synthetic_models(args.quick, dtype, args.device, seed=args.seed)
        params = models.description["parameters"]
        print(f"engine benchmark on {args.device} ({threads} threads, {str(dtype).removeprefix('torch.')}): "
              f"{models.description['kind']} models, knowledge {params['knowledge'] / 1e6:.1f}M, "
              f"tuned {params['tuned'] / 1e6:.1f}M, reference {params['reference'] / 1e6:.1f}M parameters",
              flush=True)
        settings = replace(QUICK_SETTINGS if args.quick else BenchSettings(), seed=args.seed)
        if args.tensor_parallel_size > 1:
            return _bench_tensor_parallel(models, settings, args, threads)
        results = run_engine_benchmark(models, settings, args.device, progress=not args.no_progress)
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(saved_threads)
    data = report.payload(results, models.description, settings, command=args.command_line, device=args.device,
                          dtype=str(dtype).removeprefix("torch."), threads=threads, wall_s=wall)
    print(report.format_table(results))
    print("best exact k: " + ", ".join(f"{r.workload.name}: {r.best_exact_k()}" for r in results) +
          f"; exact speculative samples identical to eft_fast EFT: {data['identical']}")
    print("\nwhere the time goes (share of wall time):")
    print(report.format_breakdown(results))
    print("\ntargets:")
    print(report.format_targets(data["targets"]))
    out = Path(args.out)
    plot = report.write_plot(results, out, f"{data['command']}  ({args.device}, {threads} threads)")
    data["plot"] = plot.name if plot is not None else None
    path = report.write_json(data, out)
    print(f"wrote {path}" + (f" and {plot}" if plot is not None else
                             " (no plot: matplotlib is not installed; pip install 'eft_fast[bench]')"))
    return 0


def _bench_tensor_parallel(models, settings, args, threads: int) -> int:
    from .bench.tensor_parallel import format_table, run_tensor_parallel_benchmark

    result = run_tensor_parallel_benchmark(models, settings, args.device, args.tensor_parallel_size)
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tensor_parallel_bench.json"
    path.write_text(json.dumps({**result, "command": args.command_line, "device": args.device, "threads": threads,
                                "models": models.description}, indent=2))
    print(f"wrote {path}")
    return 0


def _cmd_check(args) -> int:
    from .check import default_tests, run_check

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("eft-fast check: --device cuda needs a GPU", file=sys.stderr)
        return 2
    tests = args.tests or default_tests(device)
    if tests is None:
        print("eft-fast check: the test suite is not installed with the package; run from a source checkout "
              "or pass --tests PATH", file=sys.stderr)
        return 2
    print(f"eft-fast check on {device}: tests, then {'no benchmarks' if args.no_bench else 'the op and engine benchmarks'}"
          f" (results in {args.out})", flush=True)
    stages = run_check(device, Path(args.out), tests=tests, quick=args.quick, benchmarks=not args.no_bench)
    for stage in stages:
        print(f"  {'PASS' if stage.ok else 'FAIL'}  {stage.name:<13} {stage.seconds:7.1f} s  {stage.summary}")
    print(f"written: {Path(args.out) / 'check.json'}")
    return 0 if all(s.ok for s in stages) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eft-fast", description="Fast emulated fine-tuning (EFT) decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="versions, compiled backends, CUDA archs, GPU and Triton availability")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(func=_cmd_info)

    p_sample = sub.add_parser("sample", help="sample from random logits with every available backend")
    p_sample.add_argument("--batch", type=int, default=4)
    p_sample.add_argument("--vocab", type=int, default=32000)
    p_sample.add_argument("--temperature", type=float, default=1.0)
    p_sample.add_argument("--weight-top-p", type=float, default=0.9)
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p_sample.set_defaults(func=_cmd_sample)

    p_check = sub.add_parser("check", help="on a GPU machine, run this first: the device tests and both "
                                           "benchmarks, a pass/fail summary and JSON")
    p_check.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is a GPU")
    p_check.add_argument("--out", default="eft_check_out", help="output folder (check.json, tests.xml, benchmarks)")
    p_check.add_argument("--quick", action="store_true", help="the benchmarks' quick settings")
    p_check.add_argument("--no-bench", action="store_true", help="run the tests only")
    p_check.add_argument("--tests", nargs="+", help="test paths (default: the checkout's device tests)")
    p_check.set_defaults(func=_cmd_check)

    add_generate_parser(sub)
    add_serve_parser(sub)

    p_bench = sub.add_parser(
        "bench", help="benchmarks (table + JSON): the engine (default) or the fused op (--op)",
        description="Default: the engine benchmark, tokens/s of EFT decoding (naive loop, eft_fast, speculative "
                    "EFT) on a synthetic model family built in-process, or on --knowledge/--tuned/--reference.")
    p_bench.add_argument("--op", action="store_true", help="the fused op vs eager torch and the memory floor")
    p_bench.add_argument("--host-overhead", action="store_true",
                         help="the engine's host work per decode step, on tiny models (forwards and the op apart)")
    p_bench.add_argument("--knowledge", help="engine benchmark on real models: the knowledge model (HF id or path)")
    p_bench.add_argument("--tuned", help="the tuned model (with --knowledge and --reference)")
    p_bench.add_argument("--reference", help="the tuned model's base (with --knowledge and --tuned)")
    p_bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p_bench.add_argument("--dtype", default=None,
                         help="model dtype of the engine benchmark (default: float32; bfloat16 for real models "
                              "on cuda)")
    p_bench.add_argument("--threads", type=int, default=None,
                         help="torch intra-op threads (default: 1 for the engine benchmark on cpu, torch's "
                              "default otherwise)")
    p_bench.add_argument("--seed", type=int, default=0, help="seed of the synthetic family and of the requests")
    p_bench.add_argument("--quick", action="store_true", help="a small grid / a tiny family and short runs")
    p_bench.add_argument("--tensor-parallel-size", type=int, default=1,
                         help="N > 1: eft_fast EFT with the knowledge model sharded over N ranks against one rank")
    p_bench.add_argument("--out", default="eft_bench_out", help="output directory")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["eft-fast", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
