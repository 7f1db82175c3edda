"""The row-status contract of every eft_sample backend (csrc/eft_math.h, RowStatus):

- status 1 for a NaN / +inf input logit, and in the fp32 kernels for a weighted combination
  that overflows; 2 when no token is allowed; 3 for a sampling parameter out of range (the
  kernels check it per row, so a caller of the raw op is refused without a host sync);
- on every error row: token -1, log-prob NaN, and -inf over the whole row of log-probs
  (never the uninitialised memory or the NaN of -inf - -inf);
- error rows never change the other rows.

Backends: the fp64 reference (``torch``), ``cpu``, ``triton`` (the interpreter here, compiled on
a GPU) and ``cuda`` (GPU only).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from eft_fast import _extension
from eft_fast._validation import normalize_inputs
from eft_fast.ops import EFTRowError, check_status, run_backend
from eft_fast.reference import ROW_BAD_PARAM, ROW_NAN, ROW_NO_TOKEN, ROW_OK

from backend_compare import assert_backend_matches
from random_inputs import random_inputs

_CUDA = torch.cuda.is_available()
_NEEDS_CUDA = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
_HAS_TRITON = importlib.util.find_spec("triton") is not None

# (backend, device)
BACKENDS = [
    pytest.param("torch", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu",
                 marks=pytest.mark.skipif(not _extension.has_backend("cpu"), reason="native extension not built")),
    pytest.param("triton", "cuda" if _CUDA else "cpu", id="triton",
                 marks=pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")),
    pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, _NEEDS_CUDA]),
]
NATIVE = BACKENDS[1:]


def _to(inputs, device):
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dataclasses.replace(inputs, **{f.name: move(getattr(inputs, f.name)) for f in dataclasses.fields(inputs)
                                          if isinstance(getattr(inputs, f.name), torch.Tensor)})


def _assert_error_rows(out, rows):
    tokens, logprob, row_logprobs, _ = (t.cpu() for t in out)
    for b in rows:
        assert int(tokens[b]) == -1
        assert math.isnan(float(logprob[b]))
        if row_logprobs.shape[0]:
            assert bool(torch.isneginf(row_logprobs[b]).all()), f"row {b}: {row_logprobs[b][:8].tolist()}"


@pytest.mark.parametrize("weight_top_p", [1.0, 0.7])
@pytest.mark.parametrize("return_logprobs", [True, False])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_error_rows_write_minus_inf_and_spare_the_others(rng, backend, device, return_logprobs, weight_top_p):
    inputs = random_inputs(rng, batch=7, vocab=37, neg_inf_fraction=0.0)
    inputs = dataclasses.replace(inputs, weight_top_p=torch.full((7,), weight_top_p))
    inputs.tuned[0, 1, 5] = float("nan")         # status 1
    inputs.knowledge[2, 9] = float("inf")        # status 1
    inputs.tuned[0, 3, :] = float("-inf")        # every small-model score masked: status 2
    inputs.knowledge[4, :] = float("-inf")       # every EFT score masked: status 2
    inputs.top_p[5] = 0.0                        # status 3
    out = run_backend(_to(inputs, device), backend, return_logprobs)
    # With weight truncation, the tokens outside S keep z = s: row 4 still samples.
    row_4 = ROW_NO_TOKEN if weight_top_p == 1.0 else ROW_OK
    assert out[3].cpu().tolist() == [ROW_OK, ROW_NAN, ROW_NAN, ROW_NO_TOKEN, row_4, ROW_BAD_PARAM, ROW_OK]
    _assert_error_rows(out, [1, 2, 3, 5] + ([4] if row_4 else []))
    if backend != "torch":
        assert_backend_matches(inputs, out, check_rows=return_logprobs)
    with pytest.raises(EFTRowError, match=r"rows \[1, 2\].*rows \[3.*\].*rows \[5\]"):
        check_status(out[3])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_parameters_are_refused_per_row(backend, device):
    """What the validating wrapper refuses, the raw op refuses too: status 3 on that row only.
    A temperature below GREEDY_TEMPERATURE (other than 0) is out of range for the kernels
    (z / T would overflow); the wrapper maps it to 0."""
    bad = [("temperature", -1.0), ("temperature", float("nan")), ("temperature", 1e-7),
           ("temperature", float("inf")), ("weight_top_p", 0.0), ("weight_top_p", 1.5),
           ("weight_top_p", float("nan")), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.01),
           ("top_p", float("nan"))]
    batch = len(bad) + 1
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, batch, 29, generator=gen)
    inputs = normalize_inputs(logits[0], logits[1], logits[2], torch.arange(batch), torch.zeros(batch, dtype=torch.int64),
                              temperature=0.8, weight_top_p=0.9, top_k=5, top_p=0.9)
    good = run_backend(_to(inputs, device), backend, True)
    broken = dataclasses.replace(inputs, temperature=inputs.temperature.clone(), weight_top_p=inputs.weight_top_p.clone(),
                                 top_k=inputs.top_k.clone(), top_p=inputs.top_p.clone())
    for row, (name, value) in enumerate(bad):
        getattr(broken, name)[row] = value
    out = run_backend(_to(broken, device), backend, True)
    assert out[3].cpu().tolist() == [ROW_BAD_PARAM] * len(bad) + [ROW_OK]
    _assert_error_rows(out, range(len(bad)))
    assert int(out[0][-1]) == int(good[0][-1])
    torch.testing.assert_close(out[2][-1].cpu(), good[2][-1].cpu())
    # The smallest allowed temperature and the range ends are accepted.
    edge = dataclasses.replace(inputs, temperature=torch.full((batch,), 1e-5), weight_top_p=torch.ones(batch),
                               top_p=torch.ones(batch), top_k=torch.zeros(batch, dtype=torch.int64))
    assert out[3].dtype == torch.int32
    assert run_backend(_to(edge, device), backend, False)[3].cpu().tolist() == [ROW_OK] * batch


@pytest.mark.parametrize("backend,device", NATIVE)
def test_fp32_overflow_of_the_combination_is_status_1(backend, device):
    """x_R0 + beta (x_T - x_R) overflows float32 with reward weights of 3e37: a NaN/+inf row
    (status 1) in every fp32 kernel, never 'no allowed token'. The fp64 reference does not overflow."""
    zeros = torch.zeros(3, 4)
    tuned = torch.tensor([[20.0, 0.0, 1.0, 2.0], [20.0, 0.0, 1.0, 2.0], [4.0, 0.0, 1.0, 2.0]])
    reference = torch.zeros(3, 4)
    weights = torch.tensor([[3e37], [1.0], [3e37]])
    inputs = normalize_inputs(zeros, tuned, reference, torch.arange(3), torch.zeros(3, dtype=torch.int64),
                              reward_weights=weights)
    out = run_backend(_to(inputs, device), backend, True)
    # Row 0: 20 * 3e37 = 6e38 > float32 max. Row 2: 4 * 3e37 = 1.2e38 is finite.
    assert out[3].cpu().tolist() == [ROW_NAN, ROW_OK, ROW_OK]
    _assert_error_rows(out, [0])
