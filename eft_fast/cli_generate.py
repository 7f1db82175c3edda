"""`eft-fast generate`: EFT generation from the command line, JSONL out."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate with an EFT engine; one JSON line per prompt",
                       description="Generate from knowledge + (tuned - reference). Models are HF ids, local "
                                   "directories or .gguf files. Give one model alone to sample it by itself.")
    p.add_argument("--knowledge", help="the pre-trained model whose knowledge is used (e.g. the large base)")
    p.add_argument("--tuned", action="append", help="the fine-tuned model (repeat for reward interpolation)")
    p.add_argument("--reference", action="append", help="the tuned model's base (one shared, or one per --tuned)")
    p.add_argument("--tokenizer", help="tokenizer to use for every model (default: each model's own)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file", help="a file with one prompt per line, or JSONL objects with a 'prompt' field")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--weight-top-p", type=float, default=1.0)
    p.add_argument("--reward-weights", help="comma-separated weights, one per --tuned (e.g. 0.3,0.7)")
    p.add_argument("--seed", type=int, help="seed of the first prompt; prompt i uses seed + i (default: random)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--speculative-k", type=int, default=0)
    p.add_argument("--accept", default="exact", choices=["exact", "rejection"])
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | float64 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prompt-format", default=None,
                   help="auto | chat | plain | a string with {prompt}, for every model (default: tuned models "
                        "use their chat template, base models plain text)")
    p.add_argument("--output", "-o", help="JSONL output file (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def _read_prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            record = json.loads(line)
            if "prompt" not in record:
                raise ValueError(f"--prompts-file line {n}: a JSON line needs a 'prompt' field")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    return prompts


def _params(args, n: int):
    import secrets

    from .engine.sampling_params import SamplingParams

    weights = None
    if args.reward_weights:
        weights = [float(x) for x in args.reward_weights.split(",")]
    base = args.seed if args.seed is not None else secrets.randbits(62)
    return [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, weight_top_p=args.weight_top_p, reward_weights=weights,
                           seed=base + i, stop=args.stop, ignore_eos=args.ignore_eos) for i in range(n)]


def cmd_generate(args) -> int:
    from .engine.engine import EFTEngine

    try:
        prompts = _read_prompts(args)
        params = _params(args, len(prompts))
        tuned = args.tuned[0] if args.tuned and len(args.tuned) == 1 else args.tuned
        reference = args.reference[0] if args.reference and len(args.reference) == 1 else args.reference
        tokenizer = None
        if args.tokenizer:
            from .engine.loading import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer, role="tokenizer")
        engine = EFTEngine(knowledge=args.knowledge, tuned=tuned, reference=reference, tokenizer=tokenizer,
                           dtype=args.dtype, device=args.device, prompt_format=args.prompt_format,
                           speculative_k=args.speculative_k, accept=args.accept, block_size=args.block_size,
                           max_num_seqs=args.max_num_seqs)
    except (ValueError, TypeError) as e:
        print(f"eft-fast generate: error: {e}", file=sys.stderr)
        return 2
    outputs = engine.generate(prompts, params, progress=not args.no_progress and len(prompts) > 1)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for o in outputs:
            m = o.metrics
            record = {"request_id": o.request_id, "prompt": o.prompt, "text": o.text, "token_ids": o.token_ids,
                      "logprobs": o.logprobs, "finish_reason": o.finish_reason, "error": o.error,
                      "metrics": {"prompt_tokens": m.prompt_tokens, "generated_tokens": m.generated_tokens,
                                  "time_to_first_token_s": m.time_to_first_token_s, "total_time_s": m.total_time_s,
                                  "tokens_per_s": m.tokens_per_s, "proposed_tokens": m.proposed_tokens,
                                  "accepted_tokens": m.accepted_tokens, "acceptance_rate": m.acceptance_rate}}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0 if all(o.error is None for o in outputs) else 1
