"""eft_sample: the fused EFT sampling op behind one Python function, with backend dispatch."""
from __future__ import annotations

import importlib.util
import warnings
import os

import torch

from . import _extension
from ._validation import EFTInputs, normalize_inputs
from .reference import ROW_BAD_PARAM, ROW_NAN, ROW_NO_TOKEN, eft_sample_reference

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


class EFTRowError(ValueError):
    """Some rows could not be sampled: a NaN/+inf input logit (or a combination that
    overflows fp32 in the native kernels), no allowed token, or a sampling parameter out of
    range (only reachable by calling the op below the validating wrapper).

    ``rows_nan``, ``rows_no_token`` and ``rows_bad_param`` list the offending row indices.
    """

    def __init__(self, rows_nan: list[int], rows_no_token: list[int], rows_bad_param: list[int] = ()):
        parts = []
        if rows_nan:
            parts.append(f"rows {rows_nan} have NaN or +inf logits (or reward weights so large that "
                         "the combined logits overflow float32)")
        if rows_no_token:
            parts.append(f"rows {rows_no_token} have no allowed token (every token masked or filtered)")
        if rows_bad_param:
            parts.append(f"rows {list(rows_bad_param)} have a temperature, weight_top_p, top_k or top_p "
                         "out of range")
        super().__init__("eft_sample: " + "; ".join(parts))
        self.rows_nan = rows_nan
        self.rows_no_token = rows_no_token
        self.rows_bad_param = list(rows_bad_param)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that `backend` names for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return auto_backend(device)
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    if backend == "triton":
        _check_triton(device)
    if backend in ("cpu", "cuda") and not _extension.has_backend(backend):
        raise ValueError(f"backend={backend!r} is not compiled into this build of eft_fast "
                         f"(compiled: {_extension.build_info()['backends']})")
    return backend


def auto_backend(device: torch.device) -> str:
    """What ``backend="auto"`` runs on ``device``: the compiled kernel of the device ("cpu",
    "cuda"), else Triton on CUDA, else the fp64 torch reference, never silently:

    - a native extension that is there but cannot load (built for another torch, a missing
      symbol) raises its ImportError, with the reason;
    - a package built without any native backend warns (RuntimeWarning, once per call site)
      that the slow reference is in use.
    """
    try:
        backends = _extension.build_info()["backends"]
    except _extension.ExtensionUnavailable as e:
        if not e.not_built:
            raise
        backends = []
    if device.type in backends:
        return device.type
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if device.type in ("cpu", "cuda"):
        warnings.warn(f"eft_fast: no compiled {device.type} kernel in this build (compiled: {backends or 'none'}); "
                      "backend='auto' uses the fp64 torch reference, which is slow. Reinstall with `pip install .` "
                      "to build the native extension.", RuntimeWarning, stacklevel=3)
    return "torch"


def _check_triton(device: torch.device) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package (pip install 'eft_fast[triton]')")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}; without a GPU, Triton "
                         "kernels run only in its interpreter (TRITON_INTERPRET=1 in the environment)")


def _native_logits(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype == torch.float64:
        t = t.to(torch.float32)
    return t if t.stride(-1) == 1 else t.contiguous()


def run_backend(inputs: EFTInputs, backend: str, return_logprobs: bool):
    """Run one resolved backend on canonical inputs, without error checks.

    Returns (tokens [B] int64, logprob [B] fp32, row_logprobs [B, V] fp32 or [0, V], status [B] int32).
    Safe inside CUDA graphs for the cuda and triton backends (no host sync).
    """
    if backend == "torch":
        out = eft_sample_reference(*inputs.as_args())
        rows = out.row_logprobs.to(torch.float32) if return_logprobs else \
            out.row_logprobs.new_empty(0, inputs.vocab_size, dtype=torch.float32)
        return out.tokens, out.logprob.to(torch.float32), rows, out.status
    logits = [inputs.knowledge, inputs.tuned, inputs.reference]
    if len({t.dtype for t in logits if t is not None}) > 1:
        # Models in different dtypes: the kernels read one dtype; fp32 loses nothing.
        logits = [None if t is None else t.to(torch.float32) for t in logits]
    args = (*(_native_logits(t) for t in logits),
            inputs.seeds, inputs.positions, inputs.reward_weights, inputs.temperature, inputs.weight_top_p,
            inputs.top_k, inputs.top_p, inputs.vocab_size, return_logprobs)
    if backend == "triton":
        from .kernels.eft_sample import eft_sample_triton

        return eft_sample_triton(*args)
    return _extension.ops().eft_sample(*args)


def check_status(status: torch.Tensor) -> None:
    """Raise EFTRowError if any row failed (one device-to-host copy)."""
    status = status.cpu()
    if bool((status == 0).all()):
        return
    rows_nan = (status == ROW_NAN).nonzero().flatten().tolist()
    rows_no_token = (status == ROW_NO_TOKEN).nonzero().flatten().tolist()
    rows_bad_param = (status == ROW_BAD_PARAM).nonzero().flatten().tolist()
    raise EFTRowError(rows_nan, rows_no_token, rows_bad_param)


def eft_sample(knowledge, tuned, reference, seeds, positions, *, reward_weights=None, temperature=1.0,
               weight_top_p=1.0, top_k=0, top_p=1.0, vocab_size=None, return_logprobs=False,
               backend="auto"):
    """Sample one token per row from the EFT distribution (docs/DESIGN.md sections 2-3).

    Args:
        knowledge: [B, Vk] fp32/bf16/fp16 logits of the knowledge model, or None for draft
            mode (sample from the small-scale policy s).
        tuned: [B, Vt] or [R, B, Vt] logits of the tuned model(s).
        reference: [B, Vr] or [Rr, B, Vr] (Rr in {1, R}) logits of the reference model(s);
            may be None in draft mode with R = 1 and weight 1.
        seeds: [B] int64 per-request seeds (or an int for all rows).
        positions: [B] int64 absolute positions of the tokens being sampled.
        reward_weights: [B, R] (or [R]) reward weights beta; None = all ones.
        temperature: float or [B]; 0 = greedy.
        weight_top_p: float or [B] in (0, 1]; top-p truncation of the up-scaling weights.
        top_k: int or [B] int; 0 = off. top_p: float or [B] in (0, 1]; 1 = off.
        vocab_size: the shared vocabulary; needed when input widths differ (padding).
        return_logprobs: also return the [B, V] fp32 rows of log softmax(z).
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch".
    Returns:
        (tokens [B] int64, logprob [B] fp32) or, with return_logprobs,
        (tokens, logprob, row_logprobs [B, V] fp32).
    Raises:
        TypeError / ValueError naming the bad argument; EFTRowError (a ValueError) naming the
        rows with NaN logits or no allowed token.
    """
    inputs = normalize_inputs(knowledge, tuned, reference, seeds, positions, reward_weights=reward_weights,
                              temperature=temperature, weight_top_p=weight_top_p, top_k=top_k, top_p=top_p,
                              vocab_size=vocab_size)
    resolved = resolve_backend(backend, inputs.device)
    tokens, logprob, row_logprobs, status = run_backend(inputs, resolved, return_logprobs)
    check_status(status)
    if return_logprobs:
        return tokens, logprob, row_logprobs
    return tokens, logprob
