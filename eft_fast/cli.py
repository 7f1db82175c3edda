"""The `eft-fast` command line: info, sample (a demo of the fused op), generate, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cli_generate import add_generate_parser


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
    if not args.op:
        print("eft-fast bench: only the op benchmark (--op) is available in this version", file=sys.stderr)
        return 2
    from .bench.op import format_table, run_op_benchmark, write_json

    if args.device == "cuda" and not torch.cuda.is_available():
        print("eft-fast bench: --device cuda needs a GPU", file=sys.stderr)
        return 2
    print(f"op benchmark on {args.device} ({torch.get_num_threads()} threads)", flush=True)
    results, bandwidth = run_op_benchmark(
        args.device, quick=args.quick,
        progress=lambda r: print(f"  B={r.batch} V={r.vocab} {r.dtype} w_top_p={r.weight_top_p:g} done", flush=True))
    print(f"copy bandwidth: {bandwidth:.1f} GB/s")
    print(format_table(results))
    path = write_json(results, bandwidth, Path(args.out))
    print(f"wrote {path}")
    return 0


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

    add_generate_parser(sub)

    p_bench = sub.add_parser("bench", help="benchmarks (JSON + table)")
    p_bench.add_argument("--op", action="store_true", help="the fused op vs eager torch and the memory floor")
    p_bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p_bench.add_argument("--quick", action="store_true", help="a small grid")
    p_bench.add_argument("--out", default="eft_bench_out", help="output directory")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
