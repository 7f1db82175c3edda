"""Prefix caching on a shared-prefix workload: the same requests with the cache on and off.

    python bench/prefix_bench.py [--quick] [--requests 64] [--prefix-len 512] [--question-len 16]
                                 [--max-tokens 16] [--json out.json]

64 requests share a 512-token "system prompt" (random token ids) and each adds 16 distinct
ones; all are submitted together to one engine over the synthetic family of `eft-fast bench`
(one torch thread). Reported per setting: prefill tokens computed per model, time to first
token (mean, p50, p90), wall time and output tokens/s; the tokens must be identical.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

import eft_fast
from eft_fast.bench.serve_load import percentile
from eft_fast.bench.synthetic import QUICK_SPEC, FamilySpec, build_family


def workload(vocab: int, requests: int, prefix_len: int, question_len: int) -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(question_len)] for _ in range(requests)]


def run(family, prompts, max_tokens: int, caching: bool) -> tuple[dict, list[list[int]]]:
    engine = eft_fast.EFTEngine(knowledge=family.knowledge, tuned=family.tuned, reference=family.reference,
                                enable_prefix_caching=caching)
    params = [eft_fast.SamplingParams(max_tokens=max_tokens, seed=i, ignore_eos=True) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    ttft = [o.metrics.time_to_first_token_s * 1e3 for o in outputs]
    tokens = sum(len(o.token_ids) for o in outputs)
    stats = engine.stats()
    return {"prefix_caching": caching, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "prefill_tokens_computed": stats["prefill_tokens_computed"],
            "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
            "ttft_ms": {"mean": sum(ttft) / len(ttft), "p50": percentile(ttft, 50), "p90": percentile(ttft, 90)}}, \
        [o.token_ids for o in outputs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny synthetic family")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--question-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    family = build_family(QUICK_SPEC if args.quick else FamilySpec())
    prompts = workload(family.spec.vocab_size, args.requests, args.prefix_len, args.question_len)
    results, tokens = [], []
    for caching in (False, True):
        result, out = run(family, prompts, args.max_tokens, caching)
        results.append(result)
        tokens.append(out)
        computed = result["prefill_tokens_computed"]
        print(f"prefix caching {'on ' if caching else 'off'}: prefill tokens computed {computed}, "
              f"TTFT mean {result['ttft_ms']['mean']:.0f} ms p50 {result['ttft_ms']['p50']:.0f} ms "
              f"p90 {result['ttft_ms']['p90']:.0f} ms, wall {result['wall_s']:.1f} s, "
              f"{result['output_tokens_per_s']:.1f} output tokens/s", flush=True)
    off, on = results
    saved = {m: 1 - on["prefill_tokens_computed"][m] / off["prefill_tokens_computed"][m]
             for m in off["prefill_tokens_computed"]}
    print(f"prefill tokens saved: {', '.join(f'{m} {s:.1%}' for m, s in saved.items())}; "
          f"wall {off['wall_s'] / on['wall_s']:.2f}x faster; tokens identical: {tokens[0] == tokens[1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "saved": saved, "identical": tokens[0] == tokens[1]}, f, indent=2)
    return 0 if tokens[0] == tokens[1] else 1


if __name__ == "__main__":
    sys.exit(main())
