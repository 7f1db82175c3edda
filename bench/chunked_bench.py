"""Chunked prefill on a long-prompt arrival: a long prompt arrives while 16 requests decode.

    python bench/chunked_bench.py [--quick] [--long-len 4000] [--budget 512] [--json out.json]

16 requests (32-token prompts, 96 output tokens) decode on one engine over the synthetic family
of `eft-fast bench` (its context raised to hold the long prompt; one torch thread); once each
has 8 tokens, a 4,000-token prompt arrives. With chunked prefill off, its prefill is one step
that stalls every running request; on, it is split into chunks of ``--budget`` tokens, each
step also carrying the 16 decode tokens. Reported: the running requests' inter-token latency
(p50 / p99 / max) while the long prompt is being prefilled, its time to first token, and the
whole run's wall time; the tokens must be identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

import torch

import eft_fast
from eft_fast.bench.serve_load import percentile
from eft_fast.bench.synthetic import QUICK_SPEC, FamilySpec, build_family


def run(family, short_prompts, long_prompt, *, chunked: bool, budget: int) -> tuple[dict, list]:
    engine = eft_fast.EFTEngine(knowledge=family.knowledge, tuned=family.tuned, reference=family.reference,
                                enable_chunked_prefill=chunked, max_num_batched_tokens=budget,
                                enable_prefix_caching=False, max_num_seqs=32)
    ids = [engine.add_request(p, eft_fast.SamplingParams(max_tokens=96, seed=i, ignore_eos=True))
           for i, p in enumerate(short_prompts)]
    last_token_at = {}
    gaps = []                            # (previous token's time, this token's time) of the running requests
    long_id = long_added = long_first = None
    start = time.perf_counter()
    while engine.has_unfinished() or long_id is None:
        deltas = engine.step()
        now = time.perf_counter()
        for d in deltas:
            if d.request_id == long_id and d.token_ids and long_first is None:
                long_first = now
            if d.request_id in ids and d.token_ids:
                if d.request_id in last_token_at:
                    gaps.append((last_token_at[d.request_id], now))
                last_token_at[d.request_id] = now
        if long_id is None and all(len(engine.output(i).token_ids) >= 8 for i in ids):
            long_id = engine.add_request(long_prompt, eft_fast.SamplingParams(max_tokens=8, seed=99, ignore_eos=True))
            long_added = time.perf_counter()
    wall = time.perf_counter() - start
    # the gaps that overlap the long prompt's prefill (from its arrival to its first token)
    ms = [(b - a) * 1e3 for a, b in gaps if b > long_added and a < long_first]
    tokens = [engine.output(i).token_ids for i in ids + [long_id]]
    return {"chunked_prefill": chunked, "budget": budget, "wall_s": wall,
            "long_prompt_ttft_ms": (long_first - long_added) * 1e3,
            "itl_during_long_prefill_ms": {"n": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99),
                                           "max": max(ms) if ms else float("nan")}}, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny synthetic family")
    p.add_argument("--long-len", type=int, default=4000)
    p.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (the chunk budget)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = QUICK_SPEC if args.quick else FamilySpec()
    family = build_family(dataclasses.replace(spec, max_position_embeddings=args.long_len + 64))
    rng = random.Random(0)
    vocab = spec.vocab_size
    short = [[rng.randrange(3, vocab) for _ in range(32)] for _ in range(16)]
    long_prompt = [rng.randrange(3, vocab) for _ in range(args.long_len)]
    results, tokens = [], []
    for chunked in (False, True):
        result, out = run(family, short, long_prompt, chunked=chunked, budget=args.budget)
        results.append(result)
        tokens.append(out)
        itl = result["itl_during_long_prefill_ms"]
        print(f"chunked prefill {'on ' if chunked else 'off'} (budget {args.budget}): running requests' ITL while "
              f"the {args.long_len}-token prompt prefills p50 {itl['p50']:.0f} ms p99 {itl['p99']:.0f} ms "
              f"max {itl['max']:.0f} ms ({itl['n']} gaps); its TTFT {result['long_prompt_ttft_ms']:.0f} ms; "
              f"wall {result['wall_s']:.1f} s", flush=True)
    print(f"tokens identical: {tokens[0] == tokens[1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "identical": tokens[0] == tokens[1]}, f, indent=2)
    return 0 if tokens[0] == tokens[1] else 1


if __name__ == "__main__":
    sys.exit(main())
