"""Serving benchmark: `eft-fast serve` driven by N concurrent streaming clients.

    python bench/serve_bench.py [--quick] [--clients 1,4,16] [--num-prompts 48] [--max-tokens 64]
                                [--speculative-k 0] [--knowledge K --tuned T --reference R] [--json out.json]
    python bench/serve_bench.py --base-url http://127.0.0.1:8000 --model NAME   # a server already running

Default models: the synthetic EFT family of `eft-fast bench` (saved to a temporary folder with
a word-level tokenizer over its vocabulary), served on 127.0.0.1 by a subprocess with one
torch thread. For each client count it reports request and output-token throughput, TTFT, ITL,
TPOT and end-to-end latency (mean, p50, p90, p99). The baseline is the same engine run
offline: `EFTEngine.generate` on the same prompts and seeds in this process with as many
requests running at once as there are clients (max_num_seqs), after the server has stopped (so
the two never share the cores): what the HTTP server, SSE and the engine thread cost on top of
the engine itself.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from eft_fast.bench.serve_load import run_serving_benchmark
from eft_fast.bench.serve_process import running_server

MODEL_NAME = "eft-bench"


def word_level_tokenizer(vocab_size: int):
    """A real HF tokenizer over ids 0..V-1: token i is the word "w<i>" (the synthetic family has no text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token=f"w{vocab_size - 1}")


def save_synthetic_family(root: Path, quick: bool) -> dict[str, str]:
    from eft_fast.bench.synthetic import QUICK_SPEC, FamilySpec, build_family

    spec = QUICK_SPEC if quick else FamilySpec()
    family = build_family(spec)
    tokenizer = word_level_tokenizer(spec.vocab_size)
    dirs = {}
    for role in ("knowledge", "tuned", "reference"):
        path = root / role
        getattr(family, role).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[role] = str(path)
    return dirs


def random_prompts(vocab_size: int, num: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab_size - 1) for _ in range(length)] for _ in range(num)]


def offline_baseline(dirs: dict[str, str], prompts, max_tokens: int, speculative_k: int, concurrency: int) -> dict:
    """Output tokens/s of EFTEngine.generate on the same prompts and seeds with at most
    ``concurrency`` requests running at once (max_num_seqs), one torch thread."""
    import eft_fast

    torch.set_num_threads(1)
    engine = eft_fast.EFTEngine(knowledge=dirs["knowledge"], tuned=dirs["tuned"], reference=dirs["reference"],
                                speculative_k=speculative_k, max_num_seqs=concurrency)
    params = [eft_fast.SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    duration = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"max_num_seqs": concurrency, "duration_s": duration, "output_tokens": tokens,
            "output_throughput": tokens / duration}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="benchmark a server already running (no baseline)")
    p.add_argument("--model", default=MODEL_NAME, help="the served model name (with --base-url)")
    p.add_argument("--api-key")
    p.add_argument("--knowledge")
    p.add_argument("--tuned")
    p.add_argument("--reference")
    p.add_argument("--quick", action="store_true", help="the tiny synthetic family")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--speculative-k", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",")]

    def load(url: str, prompts) -> list[dict]:
        results = []
        for n in levels:
            result = asyncio.run(run_serving_benchmark(url, args.model, prompts, num_clients=n,
                                                       max_tokens=args.max_tokens, api_key=args.api_key))
            print(result.format_table(), flush=True)
            results.append(result.to_dict())
        return results

    report = {"clients": levels, "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "speculative_k": args.speculative_k}
    if args.base_url:
        prompts = [f"Prompt {i}: tell a story." for i in range(args.num_prompts)]
        report["serving"] = load(args.base_url, prompts)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if args.knowledge:
                dirs = {"knowledge": args.knowledge, "tuned": args.tuned, "reference": args.reference}
            else:
                print("saving the synthetic family ...", flush=True)
                dirs = save_synthetic_family(Path(tmp), args.quick)
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(dirs["tuned"]).vocab_size
            prompts = random_prompts(vocab, args.num_prompts, args.prompt_len)
            serve_args = ["--knowledge", dirs["knowledge"], "--tuned", dirs["tuned"], "--reference",
                          dirs["reference"], "--served-model-name", args.model, "--log-level", "warning",
                          "--speculative-k", str(args.speculative_k)]
            with running_server(serve_args, Path(tmp), threads=1) as server:
                report["serving"] = load(server.url, prompts)
            report["offline_generate"] = [offline_baseline(dirs, prompts, args.max_tokens, args.speculative_k, n)
                                          for n in levels]
        print("baseline: offline EFTEngine.generate on the same prompts, max_num_seqs = clients")
        for n, served, offline in zip(levels, report["serving"], report["offline_generate"]):
            print(f"  {n:>3} clients: served {served['output_throughput']:.1f} vs offline "
                  f"{offline['output_throughput']:.1f} output tokens/s = "
                  f"{served['output_throughput'] / offline['output_throughput']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
