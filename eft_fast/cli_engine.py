"""The command-line options that build an EFTEngine, shared by `eft-fast generate` and
`eft-fast serve`, and the mapping of engine errors back to those options."""
from __future__ import annotations

import argparse
import re

# Option names of the SamplingParams / EngineConfig fields whose errors the CLI passes on.
_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
          "weight_top_p": "--weight-top-p", "reward_weights": "--reward-weights", "seed": "--seed",
          "stop": "--stop", "speculative_k": "--speculative-k", "block_size": "--block-size",
          "max_num_seqs": "--max-num-seqs", "dtype": "--dtype", "device": "--device",
          "tensor_parallel_size": "--tensor-parallel-size", "kv_cache_bytes": "--kv-cache-bytes",
          "max_model_len": "--max-model-len", "max_num_batched_tokens": "--max-num-batched-tokens"}
_LEADING_NAME = re.compile(r"^([a-z_]+)\b")


class UsageError(ValueError):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


def add_model_arguments(p) -> None:
    p.add_argument("--knowledge", help="the pre-trained model whose knowledge is used (e.g. the large base)")
    p.add_argument("--tuned", action="append", help="the fine-tuned model (repeat for reward interpolation)")
    p.add_argument("--reference", action="append", help="the tuned model's base (one shared, or one per --tuned)")
    p.add_argument("--tokenizer", help="tokenizer to use for every model (default: each model's own)")


def add_engine_arguments(p) -> None:
    p.add_argument("--speculative-k", type=_draft_length, default=0,
                   help="draft tokens per round (0 = off), or 'auto' (adaptive, exact acceptance)")
    p.add_argument("--accept", default="exact", choices=["exact", "rejection"])
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | float64 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV cache budget per model in bytes (default: 1 GiB, at most enough for --max-num-seqs "
                        "full-length sequences)")
    p.add_argument("--max-model-len", type=int, default=None, help="context cap (default: the models' own)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of repeated prefixes (on by default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="the most tokens one step computes per model (the prompt chunk budget)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt whole, in steps without decode tokens (chunked by default)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the knowledge model over N processes (gloo on CPU, one GPU each on CUDA); "
                        "--knowledge must then be a path or hub id")
    p.add_argument("--prompt-format", default=None,
                   help="auto | chat | plain | a string with {prompt}, for every model (default: tuned models "
                        "use their chat template, base models plain text)")


def build_engine(args):
    """The EFTEngine of the command line's models and options."""
    from .engine.engine import EFTEngine

    tuned = args.tuned[0] if args.tuned and len(args.tuned) == 1 else args.tuned
    reference = args.reference[0] if args.reference and len(args.reference) == 1 else args.reference
    tokenizer = None
    if args.tokenizer:
        from .engine.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, role="tokenizer")
    return EFTEngine(knowledge=args.knowledge, tuned=tuned, reference=reference, tokenizer=tokenizer,
                     dtype=args.dtype, device=args.device, prompt_format=args.prompt_format,
                     speculative_k=args.speculative_k, accept=args.accept, block_size=args.block_size,
                     max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes,
                     max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
                     enable_prefix_caching=not args.no_prefix_caching,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     enable_chunked_prefill=not args.no_chunked_prefill)


def name_flag(message: str) -> str:
    """Replace a leading field name (``top_p must be ...``) by its option (``--top-p must be ...``)."""
    match = _LEADING_NAME.match(message)
    if match and match.group(1) in _FLAGS:
        return _FLAGS[match.group(1)] + message[match.end():]
    return message


def check_device(device: str | None) -> None:
    """--device names a torch device, and a CUDA one that this machine has."""
    from .engine.loading import parse_device

    try:
        parse_device(device)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--device: {e}") from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line (the type name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _draft_length(text: str) -> int | str:
    """--speculative-k: an int, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or 'auto', got {text!r}") from None
