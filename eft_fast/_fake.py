"""Fake (meta) implementations of the native ops, for torch.compile and shape propagation.

Registered once, when eft_fast._extension loads the extension. Shapes follow the schemas
in csrc/registration.cpp.
"""
from __future__ import annotations

import torch


def register_fake_impls() -> None:
    @torch.library.register_fake("eft_fast::eft_sample")
    def _eft_sample_fake(knowledge, tuned, reference, seeds, positions, reward_weights, temperature,
                         weight_top_p, top_k, top_p, vocab_size, return_logprobs):
        batch = seeds.shape[0]
        rows = batch if return_logprobs else 0
        return (seeds.new_empty(batch, dtype=torch.int64), seeds.new_empty(batch, dtype=torch.float32),
                seeds.new_empty(rows, vocab_size, dtype=torch.float32),
                seeds.new_empty(batch, dtype=torch.int32))

    @torch.library.register_fake("eft_fast::gumbel_noise")
    def _gumbel_noise_fake(seeds, positions, vocab_size):
        return seeds.new_empty(seeds.shape[0], vocab_size, dtype=torch.float32)
