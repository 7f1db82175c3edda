"""The public function eft_fast.eft_sample: argument checks, errors by row, and the happy path.

Runs on backend="torch" and, where it is compiled and implemented, backend="cpu".
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import eft_fast
from eft_fast import _extension

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=["torch", "cpu"])
def backend(request) -> str:
    if request.param == "cpu" and not _extension.has_backend("cpu"):
        pytest.skip("the native extension (backend='cpu') is not built")
    return request.param


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def named(arg: str) -> str:
    """A regex that finds the argument name as a whole identifier (top_p does not match weight_top_p)."""
    return rf"(?<![\w]){re.escape(arg)}(?![\w])"


def randn(rng, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=rng).to(dtype)


def rand_seeds(rng, n):
    return torch.randint(-2**63, 2**63 - 1, (n,), generator=rng, dtype=torch.int64)


def rand_positions(rng, n):
    return torch.randint(0, 2**32, (n,), generator=rng, dtype=torch.int64)


B, V = 4, 11


@pytest.fixture
def inputs(rng):
    """A valid set of arguments: dict(knowledge, tuned, reference, seeds, positions)."""
    return dict(knowledge=randn(rng, B, V), tuned=randn(rng, B, V), reference=randn(rng, B, V),
                seeds=rand_seeds(rng, B), positions=rand_positions(rng, B))


def call(args: dict, **kw):
    a = dict(args)
    return eft_fast.eft_sample(a.pop("knowledge"), a.pop("tuned"), a.pop("reference"), a.pop("seeds"),
                               a.pop("positions"), **a, **kw)


def with_(args: dict, **changes) -> dict:
    a = dict(args)
    a.update(changes)
    return a


# ---------------------------------------------------------------------------------------------
# bad arguments: ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------------------------

BAD_LOGITS_SHAPES = [
    ("knowledge", (V,)), ("knowledge", (1, B, V)), ("knowledge", (B + 1, V)), ("knowledge", (B, 0)),
    ("tuned", (V,)), ("tuned", (1, 1, B, V)), ("tuned", (B, 0)), ("tuned", (0, B, V)),
    ("reference", (V,)), ("reference", (1, 1, B, V)), ("reference", (B + 1, V)), ("reference", (1, B + 1, V)),
    ("reference", (3, B, V)),  # Rr = 3 with R = 1
    ("reference", (2, B, V)),  # Rr = 2 with R = 1
]


@pytest.mark.parametrize("arg,shape", BAD_LOGITS_SHAPES)
def test_bad_logits_shape(inputs, backend, arg, shape):
    with pytest.raises(ValueError, match=named(arg)):
        call(with_(inputs, **{arg: torch.zeros(shape)}), backend=backend)


def test_tuned_batch_mismatch_names_an_argument(inputs, backend):
    """tuned has B + 1 rows: the knowledge / reference shapes no longer agree with it."""
    with pytest.raises(ValueError, match=f"{named('knowledge')}|{named('reference')}|{named('seeds')}"):
        call(with_(inputs, tuned=torch.zeros(B + 1, V)), backend=backend)


@pytest.mark.parametrize("Rr", [1, 2, 3])
def test_reference_models_count(rng, backend, Rr):
    """With R = 2 tuned models, reference must hold 1 or 2 models."""
    args = dict(knowledge=randn(rng, B, V), tuned=randn(rng, 2, B, V), reference=randn(rng, Rr, B, V),
                seeds=rand_seeds(rng, B), positions=rand_positions(rng, B))
    if Rr == 3:
        with pytest.raises(ValueError, match=named("reference")):
            call(args, backend=backend)
    else:
        tokens, logprob = call(args, backend=backend)
        assert tokens.shape == (B,)


@pytest.mark.parametrize("arg", ["knowledge", "tuned", "reference"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_logits(inputs, backend, arg, dtype):
    with pytest.raises(TypeError, match=named(arg)):
        call(with_(inputs, **{arg: torch.zeros(B, V, dtype=dtype)}), backend=backend)


@pytest.mark.parametrize("arg", ["knowledge", "tuned", "reference"])
@pytest.mark.parametrize("value", [lambda: [[0.0] * V] * B, lambda: np.zeros((B, V), dtype=np.float32),
                                   lambda: 1.0], ids=["list", "numpy", "float"])
def test_non_tensor_logits(inputs, backend, arg, value):
    with pytest.raises(TypeError, match=named(arg)):
        call(with_(inputs, **{arg: value()}), backend=backend)


@pytest.mark.parametrize("arg", ["knowledge", "reference", "seeds", "positions"])
def test_device_mismatch(inputs, backend, arg):
    moved = with_(inputs, **{arg: inputs[arg].to("meta")})
    with pytest.raises(ValueError, match=named(arg)):
        call(moved, backend=backend)


@pytest.mark.parametrize("arg", ["reward_weights", "temperature", "top_p", "weight_top_p", "top_k"])
def test_device_mismatch_parameters(inputs, backend, arg):
    value = {"reward_weights": torch.ones(B, 1), "temperature": torch.ones(B), "top_p": torch.ones(B),
             "weight_top_p": torch.ones(B), "top_k": torch.zeros(B, dtype=torch.int64)}[arg].to("meta")
    with pytest.raises(ValueError, match=named(arg)):
        call(inputs, backend=backend, **{arg: value})


BAD_VALUES = [
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "per_row_negative"),
    ("weight_top_p", 0.0), ("weight_top_p", 1.5), ("weight_top_p", -0.1), ("weight_top_p", float("nan")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")), ("top_p", "per_row_zero"),
    ("top_k", -1), ("top_k", "per_row_negative"),
    ("temperature", "wrong_length"), ("top_k", "wrong_length"), ("top_p", "wrong_length"),
]


def _bad_value(arg, value):
    if value == "per_row_negative":
        t = torch.ones(B) if arg == "temperature" else torch.zeros(B, dtype=torch.int64)
        t[2] = -1
        return t
    if value == "per_row_zero":
        t = torch.ones(B)
        t[1] = 0
        return t
    if value == "wrong_length":
        return torch.ones(B + 1) if arg != "top_k" else torch.zeros(B + 1, dtype=torch.int64)
    return value


@pytest.mark.parametrize("arg,value", BAD_VALUES)
def test_bad_parameter_values(inputs, backend, arg, value):
    with pytest.raises(ValueError, match=named(arg)):
        call(inputs, backend=backend, **{arg: _bad_value(arg, value)})


BAD_TYPES = [
    ("top_k", 2.5), ("top_k", 2.0), ("top_k", torch.full((B,), 2.0)), ("top_k", True), ("top_k", "3"),
    ("temperature", "1.0"), ("temperature", None), ("temperature", torch.ones(B, dtype=torch.bool)),
    ("top_p", [0.5] * B), ("weight_top_p", "0.5"),
]


@pytest.mark.parametrize("arg,value", BAD_TYPES)
def test_bad_parameter_types(inputs, backend, arg, value):
    with pytest.raises(TypeError, match=named(arg)):
        call(inputs, backend=backend, **{arg: value})


@pytest.mark.parametrize("value", [-1, "per_row", 2**32])
def test_bad_positions(inputs, backend, value):
    if value == "per_row":
        value = inputs["positions"].clone()
        value[3] = -5
    elif isinstance(value, int):
        value = torch.full((B,), value, dtype=torch.int64)
    with pytest.raises(ValueError, match=named("positions")):
        call(with_(inputs, positions=value), backend=backend)


@pytest.mark.parametrize("arg", ["seeds", "positions"])
@pytest.mark.parametrize("value", [lambda: torch.zeros(B), lambda: torch.zeros(B, dtype=torch.float64),
                                   lambda: torch.zeros(B, dtype=torch.bool), lambda: 1.5, lambda: "7"],
                         ids=["fp32", "fp64", "bool", "float", "str"])
def test_seeds_positions_bad_type(inputs, backend, arg, value):
    with pytest.raises(TypeError, match=named(arg)):
        call(with_(inputs, **{arg: value()}), backend=backend)


@pytest.mark.parametrize("arg", ["seeds", "positions"])
def test_seeds_positions_bad_shape(inputs, backend, arg):
    for bad in (torch.zeros(B + 1, dtype=torch.int64), torch.zeros(B, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match=named(arg)):
            call(with_(inputs, **{arg: bad}), backend=backend)


@pytest.mark.parametrize("bad", ["shape_wide", "shape_1d", "shape_tall", "nan", "inf", "int", "list"])
def test_bad_reward_weights(inputs, backend, bad):
    value, exc = {
        "shape_wide": (torch.ones(B, 2), ValueError),
        "shape_1d": (torch.ones(3), ValueError),
        "shape_tall": (torch.ones(B + 1, 1), ValueError),
        "nan": (torch.tensor([[1.0]] * (B - 1) + [[float("nan")]]), ValueError),
        "inf": (torch.full((B, 1), float("inf")), ValueError),
        "int": (torch.ones(B, 1, dtype=torch.int64), TypeError),
        "list": ([[1.0]] * B, TypeError),
    }[bad]
    with pytest.raises(exc, match=named("reward_weights")):
        call(inputs, backend=backend, reward_weights=value)


def test_bad_reward_weights_two_models(rng, backend):
    args = dict(knowledge=randn(rng, B, V), tuned=randn(rng, 2, B, V), reference=randn(rng, B, V),
                seeds=rand_seeds(rng, B), positions=rand_positions(rng, B))
    for value in (torch.ones(B, 1), torch.ones(B, 3), torch.ones(2, B)):
        with pytest.raises(ValueError, match=named("reward_weights")):
            call(args, backend=backend, reward_weights=value)
    with pytest.raises(ValueError, match=named("reward_weights")):
        call(args, backend=backend, reward_weights=torch.tensor([0.5, float("nan")]))


@pytest.mark.parametrize("value,exc", [(V + 1, ValueError), (0, ValueError), (-3, ValueError),
                                       (True, TypeError), (5.0, TypeError), ("5", TypeError),
                                       (torch.tensor(5), TypeError)])
def test_bad_vocab_size(inputs, backend, value, exc):
    with pytest.raises(exc, match=named("vocab_size")):
        call(inputs, backend=backend, vocab_size=value)


def test_vocab_size_too_large_for_narrowest_input(rng, backend):
    args = dict(knowledge=randn(rng, B, V + 2), tuned=randn(rng, B, V), reference=randn(rng, B, V + 1),
                seeds=rand_seeds(rng, B), positions=rand_positions(rng, B))
    with pytest.raises(ValueError, match=named("vocab_size")):
        call(args, backend=backend, vocab_size=V + 1)
    tokens, _ = call(args, backend=backend, vocab_size=V)
    assert bool((tokens < V).all())


@pytest.mark.parametrize("arg", ["knowledge", "tuned", "reference"])
def test_vocab_size_missing_when_widths_differ(inputs, backend, arg):
    wider = torch.cat([inputs[arg], torch.zeros(*inputs[arg].shape[:-1], 3)], dim=-1)
    with pytest.raises(ValueError, match=named("vocab_size")):
        call(with_(inputs, **{arg: wider}), backend=backend)


def test_reference_none_with_knowledge(inputs, backend):
    with pytest.raises(ValueError, match=named("reference")):
        call(with_(inputs, reference=None), backend=backend)


def test_reference_none_with_two_tuned_models(rng, backend):
    args = dict(knowledge=None, tuned=randn(rng, 2, B, V), reference=None, seeds=rand_seeds(rng, B),
                positions=rand_positions(rng, B))
    with pytest.raises(ValueError, match=named("reference")):
        call(args, backend=backend)


def test_reference_none_with_reward_weight_not_one(inputs, backend):
    args = with_(inputs, knowledge=None, reference=None)
    with pytest.raises(ValueError, match=named("reference")):
        call(args, backend=backend, reward_weights=torch.full((B, 1), 0.5))


@pytest.mark.parametrize("name", ["gpu", "CPU", "", "Torch", "cuda:0", None, 1])
def test_unknown_backend(inputs, name):
    with pytest.raises((ValueError, TypeError), match=named("backend")):
        call(inputs, backend=name)


def test_cuda_backend_on_cpu_tensors(inputs):
    with pytest.raises(ValueError, match=named("backend")):
        call(inputs, backend="cuda")


def test_checks_run_before_backend(inputs):
    """A bad argument is reported even with a backend that would also be refused."""
    with pytest.raises(ValueError, match=named("temperature")):
        call(inputs, backend="cuda", temperature=-1.0)


# ---------------------------------------------------------------------------------------------
# errors by row
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["knowledge", "tuned", "reference"])
def test_nan_row_raises_row_error(inputs, backend, arg):
    bad_row = 2
    inputs[arg][bad_row, 5] = float("nan")
    with pytest.raises(eft_fast.EFTRowError, match=r"rows \[2\]") as info:
        call(inputs, backend=backend)
    assert isinstance(info.value, ValueError)
    assert info.value.rows_nan == [bad_row]
    assert info.value.rows_no_token == []


def test_row_error_lists_every_bad_row(inputs, backend):
    inputs["tuned"][1, 0] = float("nan")
    inputs["knowledge"][3, 4] = float("inf")
    inputs["reference"][0] = NEG_INF
    with pytest.raises(ValueError, match=r"rows \[1, 3\]") as info:
        call(inputs, backend=backend)
    assert info.value.rows_nan == [1, 3]
    assert info.value.rows_no_token == [0]
    assert re.search(r"rows \[0\]", str(info.value))


def test_all_masked_row_raises_row_error(inputs, backend):
    inputs["tuned"][3] = NEG_INF
    with pytest.raises(eft_fast.EFTRowError, match=r"rows \[3\]") as info:
        call(inputs, backend=backend)
    assert info.value.rows_no_token == [3]
    assert info.value.rows_nan == []


# ---------------------------------------------------------------------------------------------
# happy path
# ---------------------------------------------------------------------------------------------

def test_return_shapes_and_dtypes(inputs, backend):
    out = call(inputs, backend=backend)
    assert isinstance(out, tuple) and len(out) == 2
    tokens, logprob = out
    assert tokens.shape == (B,) and tokens.dtype == torch.int64
    assert logprob.shape == (B,) and logprob.dtype == torch.float32
    assert bool(((tokens >= 0) & (tokens < V)).all())
    assert bool(torch.isfinite(logprob).all()) and bool((logprob <= 0).all())
    out3 = call(inputs, backend=backend, return_logprobs=True)
    assert len(out3) == 3
    t3, lp3, rows = out3
    assert rows.shape == (B, V) and rows.dtype == torch.float32
    assert torch.equal(t3, tokens)
    torch.testing.assert_close(lp3, logprob)


def test_return_logprobs_rows_normalised(rng, backend):
    Bn, Vn = 6, 37
    k, t, r = randn(rng, Bn, Vn) * 3, randn(rng, Bn, Vn) * 3, randn(rng, Bn, Vn) * 3
    t[0, 5] = NEG_INF
    k[1, :3] = NEG_INF
    tokens, logprob, rows = eft_fast.eft_sample(k, t, r, rand_seeds(rng, Bn), rand_positions(rng, Bn),
                                                temperature=0.9, weight_top_p=0.8, top_k=5, top_p=0.9,
                                                return_logprobs=True, backend=backend)
    assert rows.shape == (Bn, Vn) and rows.dtype == torch.float32
    assert not bool(torch.isnan(rows).any())
    torch.testing.assert_close(torch.logsumexp(rows.double(), -1), torch.zeros(Bn, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert bool(torch.isneginf(rows[0, 5]))
    torch.testing.assert_close(logprob, rows.gather(-1, tokens[:, None])[:, 0])
    # p_w = 1: rows are log_softmax(x_K + x_T - x_R) (equation 5)
    _, _, rows1 = eft_fast.eft_sample(k, t, r, rand_seeds(rng, Bn), rand_positions(rng, Bn),
                                      return_logprobs=True, backend=backend)
    want = torch.log_softmax((k.double() + t.double() - r.double()), -1).to(torch.float32)
    torch.testing.assert_close(rows1, want, atol=1e-4, rtol=1e-5)


def test_scalar_and_per_row_parameters_agree(rng, backend):
    Bn, Vn = 8, 29
    args = dict(knowledge=randn(rng, Bn, Vn), tuned=randn(rng, 2, Bn, Vn), reference=randn(rng, Bn, Vn),
                seeds=rand_seeds(rng, Bn), positions=rand_positions(rng, Bn))
    scalar = dict(temperature=0.7, weight_top_p=0.8, top_k=6, top_p=0.9)
    per_row = dict(temperature=torch.full((Bn,), 0.7), weight_top_p=torch.full((Bn,), 0.8),
                   top_k=torch.full((Bn,), 6, dtype=torch.int64), top_p=torch.full((Bn,), 0.9))
    zero_dim = dict(temperature=torch.tensor(0.7), weight_top_p=torch.tensor(0.8), top_k=torch.tensor(6),
                    top_p=torch.tensor(0.9))
    beta = torch.tensor([0.25, 0.75])
    a = call(args, backend=backend, reward_weights=beta, return_logprobs=True, **scalar)
    b = call(args, backend=backend, reward_weights=beta.expand(Bn, 2).clone(), return_logprobs=True, **per_row)
    c = call(args, backend=backend, reward_weights=beta, return_logprobs=True, **zero_dim)
    for x, y in ((a, b), (a, c)):
        assert torch.equal(x[0], y[0])
        assert torch.equal(x[1], y[1])
        assert torch.equal(x[2], y[2])
    # int seeds for all rows == a [B] tensor of that seed; int32 tensors are accepted
    s_int = call(with_(args, seeds=12345), backend=backend)
    s_tensor = call(with_(args, seeds=torch.full((Bn,), 12345, dtype=torch.int64)), backend=backend)
    s_int32 = call(with_(args, seeds=torch.full((Bn,), 12345, dtype=torch.int32),
                         positions=args["positions"] % 2**31), backend=backend)
    s_int64 = call(with_(args, seeds=torch.full((Bn,), 12345, dtype=torch.int64),
                         positions=args["positions"] % 2**31), backend=backend)
    assert torch.equal(s_int[0], s_tensor[0])
    assert torch.equal(s_int32[0], s_int64[0])


def test_mixed_per_row_settings_match_row_by_row(rng, backend):
    """Per-row parameters act per row: each row equals that row run alone with scalar parameters."""
    Bn, Vn = 6, 23
    args = dict(knowledge=randn(rng, Bn, Vn), tuned=randn(rng, Bn, Vn), reference=randn(rng, Bn, Vn),
                seeds=rand_seeds(rng, Bn), positions=rand_positions(rng, Bn))
    T = [0.0, 0.5, 1.0, 1.5, 0.7, 2.0]
    pw = [1.0, 0.3, 0.9, 1.0, 0.5, 0.05]
    k = [0, 3, 0, 1, 5, 0]
    p = [1.0, 0.5, 0.95, 1.0, 0.2, 1.0]
    tokens, logprob, rows = call(args, backend=backend, temperature=torch.tensor(T), weight_top_p=torch.tensor(pw),
                                 top_k=torch.tensor(k), top_p=torch.tensor(p), return_logprobs=True)
    for i in range(Bn):
        one = {n: v[i:i + 1] for n, v in args.items()}
        t1, l1, r1 = call(one, backend=backend, temperature=T[i], weight_top_p=pw[i], top_k=k[i], top_p=p[i],
                          return_logprobs=True)
        assert int(t1) == int(tokens[i]), f"row {i}"
        torch.testing.assert_close(r1[0], rows[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_inputs(rng, backend, dtype):
    Bn, Vn = 8, 41
    k, t, r = randn(rng, Bn, Vn, dtype=dtype), randn(rng, Bn, Vn, dtype=dtype), randn(rng, Bn, Vn, dtype=dtype)
    seeds, positions = rand_seeds(rng, Bn), rand_positions(rng, Bn)
    tokens, logprob, rows = eft_fast.eft_sample(k, t, r, seeds, positions, return_logprobs=True,
                                                temperature=0.8, backend=backend)
    assert tokens.dtype == torch.int64 and logprob.dtype == torch.float32 and rows.dtype == torch.float32
    assert bool(((tokens >= 0) & (tokens < Vn)).all())
    # the same values in fp32 give the same distribution (all arithmetic is fp32 or better)
    t32, l32, rows32 = eft_fast.eft_sample(k.float(), t.float(), r.float(), seeds, positions,
                                           return_logprobs=True, temperature=0.8, backend=backend)
    torch.testing.assert_close(rows, rows32, atol=1e-4, rtol=1e-4)
    if backend == "torch":
        assert torch.equal(tokens, t32)
    else:
        assert (tokens == t32).float().mean() >= 0.75


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, torch.float16),
                                    (torch.float32, torch.bfloat16, torch.bfloat16)])
def test_mixed_dtypes_across_models(rng, backend, dtypes):
    """Models in different dtypes: docs/DESIGN.md does not say; a backend either runs (fp32 math) or
    refuses with a TypeError that names the model."""
    Bn, Vn = 4, 17
    k, t, r = (randn(rng, Bn, Vn, dtype=d) for d in dtypes)
    seeds, positions = rand_seeds(rng, Bn), rand_positions(rng, Bn)
    try:
        tokens, _, rows = eft_fast.eft_sample(k, t, r, seeds, positions, temperature=0.8, return_logprobs=True,
                                              backend=backend)
    except TypeError as e:
        assert re.search(f"{named('knowledge')}|{named('tuned')}|{named('reference')}", str(e)), str(e)
        return
    _, _, rows32 = eft_fast.eft_sample(k.float(), t.float(), r.float(), seeds, positions, temperature=0.8,
                                       return_logprobs=True, backend=backend)
    torch.testing.assert_close(rows, rows32, atol=1e-4, rtol=1e-4)


def test_draft_mode_api(rng, backend):
    Bn, Vn = 5, 19
    t = randn(rng, Bn, Vn)
    seeds, positions = rand_seeds(rng, Bn), rand_positions(rng, Bn)
    tokens, logprob, rows = eft_fast.eft_sample(None, t, None, seeds, positions, return_logprobs=True,
                                                backend=backend)
    torch.testing.assert_close(rows, torch.log_softmax(t, -1), atol=1e-5, rtol=1e-5)
    # with a reference and weight 1, s = l_T still
    t2, _, rows2 = eft_fast.eft_sample(None, t, randn(rng, Bn, Vn), seeds, positions, return_logprobs=True,
                                       backend=backend)
    torch.testing.assert_close(rows2, rows, atol=1e-5, rtol=1e-5)
    if backend == "torch":
        assert torch.equal(t2, tokens)


def test_deterministic_given_seeds(inputs, backend):
    a = call(inputs, backend=backend)
    b = call(inputs, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # greedy ignores the seed
    g1 = call(inputs, backend=backend, temperature=0.0)
    g2 = call(with_(inputs, seeds=inputs["seeds"] + 1), backend=backend, temperature=0.0)
    assert torch.equal(g1[0], g2[0])


def test_inputs_not_modified(inputs, backend):
    snapshot = {n: v.clone() for n, v in inputs.items()}
    inputs["tuned"] = inputs["tuned"].t().contiguous().t()  # non-contiguous is fine too
    snapshot["tuned"] = inputs["tuned"].clone()
    call(inputs, backend=backend, weight_top_p=0.5, top_k=3, return_logprobs=True)
    for n, v in inputs.items():
        assert torch.equal(v, snapshot[n]), n


def test_auto_backend_on_cpu(inputs):
    """backend='auto' runs on CPU tensors and gives what the torch backend gives (up to near-ties)."""
    a = call(inputs, backend="auto", return_logprobs=True)
    b = call(inputs, backend="torch", return_logprobs=True)
    torch.testing.assert_close(a[2], b[2], atol=1e-4, rtol=1e-4)
    assert a[0].shape == (B,)


def test_tiny_temperature_is_greedy_and_huge_ints_name_the_argument():
    tuned = torch.tensor([[0.0, 5.0, 1.0]])
    for backend in ("torch", "cpu") if eft_fast._extension.has_backend("cpu") else ("torch",):
        tokens, _ = eft_fast.eft_sample(None, tuned, None, 0, 0, temperature=1e-44, backend=backend)
        assert tokens.tolist() == [1]
    with pytest.raises(ValueError, match="seeds"):
        eft_fast.eft_sample(None, tuned, None, 2**64, 0)
    with pytest.raises(ValueError, match="top_k"):
        eft_fast.eft_sample(None, tuned, None, 0, 0, top_k=2**64)
    with pytest.raises(ValueError, match="temperature"):
        eft_fast.eft_sample(None, tuned, None, 0, 0, temperature=10**400)


@pytest.mark.parametrize("arg", ["temperature", "weight_top_p", "top_p"])
@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (1e39, "float32's range"), (-1e39, "float32's range")])
def test_scalar_parameters_out_of_float32_range_name_the_argument(inputs, backend, arg, value, shown):
    with pytest.raises(ValueError, match=named(arg)) as info:
        call(inputs, backend=backend, **{arg: value})
    assert shown in str(info.value)


def test_meta_tensors_are_refused_by_name():
    meta = torch.zeros(2, 5, device="meta")
    with pytest.raises(ValueError, match="meta tensor"):
        eft_fast.eft_sample(meta, meta, meta, 0, 0)


def test_triton_backend_on_cpu_tensors_outside_the_interpreter(inputs, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("the check is for machines without a GPU")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        call(inputs, backend="triton")


def test_auto_never_falls_back_to_the_reference_silently(monkeypatch):
    from eft_fast import _extension
    from eft_fast.ops import auto_backend

    def not_built():
        raise _extension.ExtensionUnavailable("no extension", not_built=True)

    def broken():
        raise _extension.ExtensionUnavailable("eft_fast._C was built against torch 0.0 but torch 9.9 is installed")

    monkeypatch.setattr(_extension, "build_info", not_built)
    with pytest.warns(RuntimeWarning, match="fp64 torch reference"):
        assert auto_backend(torch.device("cpu")) == "torch"
    monkeypatch.setattr(_extension, "build_info", broken)
    with pytest.raises(ImportError, match="built against torch 0.0"):
        auto_backend(torch.device("cpu"))
    assert "auto_backend" in eft_fast.info()
