"""Shared fixtures for the eft_fast tests.

Inputs are fresh random on every run: each test that asks for ``rng`` gets a torch.Generator
seeded from the OS entropy pool. The seed is printed (pytest shows it with a failure's captured
output) and can be forced with EFT_TEST_SEED=<int> to replay a failing run.
"""
from __future__ import annotations

import os
import secrets

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before any kernel
# is defined, so it is set here, before test modules import them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng(request) -> torch.Generator:
    forced = os.environ.get("EFT_TEST_SEED")
    seed = int(forced) if forced else secrets.randbits(62)
    print(f"[{request.node.nodeid}] input seed: EFT_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
