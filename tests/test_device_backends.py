"""Every compiled backend of eft_sample on its own device against the fp64 reference: the `cpu`
kernel here, and on a machine with CUDA the `cuda` kernel and the compiled (not interpreted)
`triton` kernel, through the same assertions. The GPU legs carry the `gpu` marker (`pytest -m
gpu` selects them) and are skipped with "needs a CUDA device" elsewhere; the `cpu` leg runs the
same test bodies on a smaller grid, so that they are exercised on every machine.

On a GPU the grid holds the real vocabularies (32000, 128256, and 151936 inside 152064), batches
up to 257, fp32 / bf16 / fp16 logits, every filter mix, and rows whose pointers are not 16-byte
aligned; plus chi-square sampling, batch invariance, row errors, opcheck, torch.compile and the
op inside a captured CUDA graph (which would fail on any host sync).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from scipy import stats

from eft_fast import _extension
from eft_fast.ops import run_backend

from backend_compare import assert_backend_matches
from random_inputs import random_inputs

_CUDA = torch.cuda.is_available()
_NEEDS_CUDA = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
LEGS = [pytest.param("cpu", "cpu", id="cpu",
                     marks=pytest.mark.skipif(not _extension.has_backend("cpu"), reason="native extension not built")),
        pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, _NEEDS_CUDA]),
        pytest.param("cuda", "triton", id="triton", marks=[pytest.mark.gpu, _NEEDS_CUDA])]

# (vocab, logits widths or None); the GPU grid adds the real vocabularies of Llama 3 and Qwen2.
SMALL_VOCABS = [(1, None), (7, None), (32000, None)]
LARGE_VOCABS = [(128256, None), (151936, (152064, 152064, 152064))]


def _on(inputs, device: str):
    """The inputs on ``device``; rows of every logits tensor start 4 bytes past a 16-byte boundary."""
    def move(t):
        if t is None or not t.is_floating_point() or t.dim() < 2:
            return None if t is None else t.to(device)
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=device)
        wide[..., 1:] = t.to(device)
        return wide[..., 1:]              # row stride V + 1, offset one element: unaligned rows

    return dataclasses.replace(
        inputs, knowledge=move(inputs.knowledge), tuned=move(inputs.tuned), reference=move(inputs.reference),
        seeds=inputs.seeds.to(device), positions=inputs.positions.to(device),
        reward_weights=inputs.reward_weights.to(device), temperature=inputs.temperature.to(device),
        weight_top_p=inputs.weight_top_p.to(device), top_k=inputs.top_k.to(device), top_p=inputs.top_p.to(device))


def _grid(device: str):
    if device == "cpu":
        return [(b, v, w) for b in (1, 3, 64) for v, w in SMALL_VOCABS]
    return [(b, v, w) for b in (1, 3, 64, 257) for v, w in SMALL_VOCABS + LARGE_VOCABS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", LEGS)
def test_grid_matches_reference(rng, device, backend, dtype):
    for batch, vocab, widths in _grid(device):
        inputs = random_inputs(rng, batch=batch, vocab=vocab, dtype=dtype, widths=widths,
                               num_tuned=1 + batch % 2, per_model_reference=batch == 3)
        ties = assert_backend_matches(inputs, run_backend(_on(inputs, device), backend, True), check_rows=True)
        budget = batch // (10 if dtype == torch.float32 else 4) + 2
        assert ties <= budget, f"B={batch} V={vocab}: {ties} near-tie rows, the tie detector is too loose"


@pytest.mark.parametrize("device,backend", LEGS)
def test_draft_mode_and_reward_interpolation(rng, device, backend):
    for kw in (dict(draft=True), dict(draft=True, draft_reference=False), dict(num_tuned=3, per_model_reference=True)):
        inputs = random_inputs(rng, batch=9, vocab=1000, **kw)
        assert_backend_matches(inputs, run_backend(_on(inputs, device), backend, True), check_rows=True)


@pytest.mark.parametrize("device,backend", LEGS)
def test_batch_invariance_and_row_errors(rng, device, backend):
    inputs = random_inputs(rng, batch=12, vocab=777)
    whole = run_backend(_on(inputs, device), backend, False)
    for i in (0, 5, 11):
        row = dataclasses.replace(inputs, knowledge=inputs.knowledge[i:i + 1], tuned=inputs.tuned[:, i:i + 1],
                                  reference=inputs.reference[:, i:i + 1], seeds=inputs.seeds[i:i + 1],
                                  positions=inputs.positions[i:i + 1], reward_weights=inputs.reward_weights[i:i + 1],
                                  temperature=inputs.temperature[i:i + 1], weight_top_p=inputs.weight_top_p[i:i + 1],
                                  top_k=inputs.top_k[i:i + 1], top_p=inputs.top_p[i:i + 1])
        alone = run_backend(_on(row, device), backend, False)
        assert int(alone[0][0]) == int(whole[0][i])
    broken = dataclasses.replace(inputs, knowledge=inputs.knowledge.clone())
    broken.knowledge[4, 3] = float("nan")
    tokens, _, _, status = (t.cpu() for t in run_backend(_on(broken, device), backend, False))
    assert status.tolist()[4] != 0 and tokens[4] == -1
    others = [i for i in range(12) if i != 4]
    assert tokens[others].tolist() == whole[0].cpu()[others].tolist()


@pytest.mark.parametrize("device,backend", LEGS)
def test_chi_square_sampling(device, backend):
    """10,000 draws of one row (fixed seed per draw, fresh positions) follow the EFT distribution;
    the threshold's false-failure probability is 1e-7."""
    gen = torch.Generator().manual_seed(1234)
    inputs = random_inputs(gen, batch=1, vocab=16, filters=False, neg_inf_fraction=0.0, scale=1.0)
    n = 10_000
    many = dataclasses.replace(
        inputs, knowledge=inputs.knowledge.expand(n, -1), tuned=inputs.tuned.expand(-1, n, -1),
        reference=inputs.reference.expand(-1, n, -1), seeds=inputs.seeds.expand(n), positions=torch.arange(n),
        reward_weights=inputs.reward_weights.expand(n, -1), temperature=torch.ones(n),
        weight_top_p=torch.ones(n), top_k=torch.zeros(n, dtype=torch.int64), top_p=torch.ones(n))
    tokens, _, rows, _ = run_backend(_on(many, device), backend, True)
    probs = rows[0].double().exp().cpu()
    counts = torch.bincount(tokens.cpu(), minlength=16).double()
    keep = probs * n >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    expected = torch.cat([probs[keep], probs[~keep].sum(0, keepdim=True)]) * n
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    _, p = stats.chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item())
    assert p > 1e-7


@pytest.mark.parametrize("device,backend", [leg for leg in LEGS if leg.id != "triton"])
def test_opcheck_and_compile(rng, device, backend):
    inputs = _on(random_inputs(rng, batch=3, vocab=769, num_tuned=2, per_model_reference=True), device)
    op = torch.ops.eft_fast.eft_sample
    for return_logprobs in (False, True):
        torch.library.opcheck(op.default, (*inputs.as_args(), return_logprobs))
    compiled = torch.compile(lambda *args: op(*args), fullgraph=True)
    assert torch.equal(compiled(*inputs.as_args(), False)[0], op(*inputs.as_args(), False)[0])


@pytest.mark.gpu
@_NEEDS_CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_op_inside_a_captured_cuda_graph(rng, backend):
    """Capture fails on any host sync; the replay equals an eager call on new inputs."""
    inputs = _on(random_inputs(rng, batch=8, vocab=32000), "cuda")
    static = dataclasses.replace(inputs, knowledge=inputs.knowledge.clone(), tuned=inputs.tuned.clone(),
                                 reference=inputs.reference.clone())
    run_backend(static, backend, False)                      # warm up (Triton compiles here)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_backend(static, backend, False)
    fresh = _on(random_inputs(rng, batch=8, vocab=32000), "cuda")
    static.knowledge.copy_(fresh.knowledge)
    static.tuned.copy_(fresh.tuned)
    static.reference.copy_(fresh.reference)
    graph.replay()
    torch.cuda.synchronize()
    want = run_backend(dataclasses.replace(static), backend, False)
    assert torch.equal(out[0], want[0]) and torch.equal(out[3], want[3])


def test_gpu_legs_exist():
    """The GPU legs are collected everywhere (and skipped without CUDA), never silently absent."""
    assert sum(1 for leg in LEGS if leg.id in ("cuda", "triton")) == 2
    assert os.environ.get("TRITON_INTERPRET") != "1" or not _CUDA, "GPU legs must run compiled Triton"
