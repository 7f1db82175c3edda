"""Tensor-parallel knowledge model on CPU: engine tokens/s at tensor_parallel_size 1 and 2, and
rank 0's time in the step broadcast per knowledge forward (gloo, 2 processes), on a small
random-init family (knowledge: 4-layer Llama, hidden 512; tuned and reference: 2 layers, 128).

    python bench/tensor_parallel.py [--requests 8] [--max-tokens 32]

One thread per process; tensor parallelism loads the knowledge model from a path, so it is
saved to a temporary directory first.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eft_fast import EFTEngine, SamplingParams
from eft_fast.engine.parallel import runner as tp_runner


def _llama(vocab: int, seed: int, layers: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                        max_position_embeddings=512)).eval()


def _tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` ids (the engine checks the models' vocabularies by id)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")))


class TimedBroadcast:
    """Wraps the step broadcast to add up rank 0's time in it."""

    def __init__(self, fn):
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, step):
        start = time.perf_counter()
        self.fn(step)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    vocab = 512
    tuned, reference = _llama(vocab, 1, 2, 128), _llama(vocab, 2, 2, 128)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (16,), generator=gen).tolist() for _ in range(args.requests)]
    params = [SamplingParams(max_tokens=args.max_tokens, seed=i, ignore_eos=True) for i in range(args.requests)]
    tokenizer = _tokenizer(vocab)
    timer = TimedBroadcast(tp_runner.broadcast_step)
    tp_runner.broadcast_step = timer
    rates, tokens = {}, {}
    with tempfile.TemporaryDirectory() as path:
        _llama(vocab, 0, 4, 512).save_pretrained(path)
        for tp in (1, 2):
            with EFTEngine(knowledge=path, tuned=tuned, reference=reference, tokenizer=tokenizer,
                           backend="cpu", block_size=16,
                           max_num_seqs=args.requests, tensor_parallel_size=tp) as engine:
                engine.generate(prompts[:1], params[0])          # warm up
                timer.calls, timer.seconds = 0, 0.0
                start = time.perf_counter()
                outs = engine.generate(prompts, params)
                elapsed = time.perf_counter() - start
            tokens[tp] = [o.token_ids for o in outs]
            rates[tp] = sum(map(len, tokens[tp])) / elapsed
            line = f"tensor_parallel_size={tp}: {rates[tp]:.1f} tokens/s ({args.requests} requests x {args.max_tokens})"
            if tp == 2:
                line += f"; step broadcast {1e3 * timer.seconds / timer.calls:.2f} ms per forward ({timer.calls} forwards)"
            print(line, flush=True)
    print(f"same tokens: {tokens[1] == tokens[2]}; tp2 / tp1 throughput: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
