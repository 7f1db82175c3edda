"""pytest-benchmark suite for eft_sample: providers "eager" (the torch composition users write
today) and the eft_fast backends, on the same inputs.

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Not part of the default test run (pytest's testpaths is tests/).
"""
from __future__ import annotations

import pytest
import torch

from eft_fast import _extension, eft_sample
from eft_fast.baselines import eager_eft_sample

SHAPES = [(1, 32000), (64, 128256), (8, 151936)]
PROVIDERS = ["eager"] + (["cpu"] if _extension.has_backend("cpu") else [])


@pytest.mark.parametrize("weight_top_p", [1.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,vocab", SHAPES, ids=[f"B{b}-V{v}" for b, v in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_eft_sample(benchmark, provider, batch, vocab, dtype, weight_top_p):
    logits = [(torch.randn(batch, vocab) * 4).to(dtype) for _ in range(3)]
    seeds = torch.randint(0, 2**62, (batch,))
    positions = torch.randint(0, 4096, (batch,))
    benchmark.group = f"B={batch} V={vocab} {dtype} w_top_p={weight_top_p}"
    if provider == "eager":
        gen = torch.Generator().manual_seed(0)
        benchmark(lambda: eager_eft_sample(*logits, weight_top_p=weight_top_p, generator=gen))
    else:
        benchmark(lambda: eft_sample(*logits, seeds, positions, weight_top_p=weight_top_p, backend=provider))
