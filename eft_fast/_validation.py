"""Argument checks and normalisation for :func:`eft_fast.eft_sample`.

Every check runs before any work and raises ``ValueError`` / ``TypeError`` naming the
argument. The result is the canonical form every backend takes (see eft_fast/reference.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_UINT32_LIMIT = 2**32
_FLOAT32_MAX = torch.finfo(torch.float32).max
GREEDY_TEMPERATURE = 1e-5


@dataclass
class EFTInputs:
    """Canonical inputs. Shapes: knowledge [B, Vk] | None, tuned [R, B, Vt],
    reference [Rr, B, Vr] | None, seeds/positions/top_k [B] int64,
    reward_weights [B, R] fp32, temperature/weight_top_p/top_p [B] fp32."""

    knowledge: torch.Tensor | None
    tuned: torch.Tensor
    reference: torch.Tensor | None
    seeds: torch.Tensor
    positions: torch.Tensor
    reward_weights: torch.Tensor
    temperature: torch.Tensor
    weight_top_p: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    vocab_size: int

    @property
    def batch_size(self) -> int:
        return self.tuned.shape[1]

    @property
    def num_tuned(self) -> int:
        return self.tuned.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tuned.device

    def as_args(self) -> tuple:
        return (self.knowledge, self.tuned, self.reference, self.seeds, self.positions,
                self.reward_weights, self.temperature, self.weight_top_p, self.top_k, self.top_p,
                self.vocab_size)


def _check_logits(name: str, t, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(t.shape)}")
    return t


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but tuned is on {device}; all inputs must share a device")


def _per_row(name: str, value, batch: int, device: torch.device, *, integer: bool) -> torch.Tensor:
    """A scalar or a [B] tensor -> [B] tensor (int64 or float32) on device."""
    dtype = torch.int64 if integer else torch.float32
    if isinstance(value, torch.Tensor):
        if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if not integer and not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or have shape [{batch}], got {tuple(value.shape)}")
        _check_device(name, value, device)
        return value.to(dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if integer and not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    if not integer:
        try:
            value = float(value)
        except OverflowError:   # an int beyond float64: fails the range checks below as +-inf
            value = math.inf if value > 0 else -math.inf
        if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
            raise ValueError(f"{name} must be within float32's range (|x| <= {_FLOAT32_MAX:.8g}), got {value}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def _require(name: str, ok: torch.Tensor, what: str, values: torch.Tensor) -> None:
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} must be {what}; rows {bad} have {values[bad].tolist()}")


def normalize_inputs(knowledge, tuned, reference, seeds, positions, *, reward_weights=None,
                     temperature=1.0, weight_top_p=1.0, top_k=0, top_p=1.0,
                     vocab_size=None) -> EFTInputs:
    """Validate the arguments of eft_sample and return them in canonical form."""
    tuned = _check_logits("tuned", tuned, (2, 3))
    if tuned.dim() == 2:
        tuned = tuned.unsqueeze(0)
    num_tuned, batch, _ = tuned.shape
    if num_tuned == 0:
        raise ValueError("tuned must hold at least one model: got shape [0, ...]")
    if batch == 0:
        raise ValueError("tuned has batch size 0; eft_sample needs at least one row")
    device = tuned.device
    if device.type == "meta":
        raise ValueError("tuned is a meta tensor (shapes only, no values): eft_sample needs real tensors; for "
                         "shape propagation trace torch.ops.eft_fast.eft_sample, which has a fake implementation")

    if knowledge is not None:
        knowledge = _check_logits("knowledge", knowledge, (2,))
        _check_device("knowledge", knowledge, device)
        if knowledge.shape[0] != batch:
            raise ValueError(f"knowledge must have shape [{batch}, V], got {tuple(knowledge.shape)}")
    if reference is not None:
        reference = _check_logits("reference", reference, (2, 3))
        _check_device("reference", reference, device)
        if reference.dim() == 2:
            reference = reference.unsqueeze(0)
        if reference.shape[0] not in (1, num_tuned) or reference.shape[1] != batch:
            raise ValueError(f"reference must have shape [{batch}, V] or [Rr, {batch}, V] with Rr in "
                             f"{{1, {num_tuned}}}, got {tuple(reference.shape)}")

    if reward_weights is None:
        weights = torch.ones(batch, num_tuned, dtype=torch.float32, device=device)
    else:
        if not isinstance(reward_weights, torch.Tensor):
            raise TypeError(f"reward_weights must be a torch.Tensor or None, got {type(reward_weights).__name__}")
        if not reward_weights.is_floating_point():
            raise TypeError(f"reward_weights must be a float tensor, got {reward_weights.dtype}")
        _check_device("reward_weights", reward_weights, device)
        weights = reward_weights
        if weights.dim() == 1 and weights.shape[0] == num_tuned:
            weights = weights[None, :].expand(batch, num_tuned)
        if weights.shape != (batch, num_tuned):
            raise ValueError(f"reward_weights must have shape [{batch}, {num_tuned}] (or [{num_tuned}]), "
                             f"got {tuple(reward_weights.shape)}")
        weights = weights.to(torch.float32).contiguous()
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("reward_weights must be finite")

    if reference is None:
        if knowledge is not None:
            raise ValueError("reference is required when knowledge is given (only draft mode may omit it)")
        if num_tuned != 1 or not bool((weights == 1).all()):
            raise ValueError("reference may be None only in draft mode with one tuned model and weight 1")

    widths = {"tuned": tuned.shape[-1]}
    if knowledge is not None:
        widths["knowledge"] = knowledge.shape[-1]
    if reference is not None:
        widths["reference"] = reference.shape[-1]
    if vocab_size is None:
        if len(set(widths.values())) != 1:
            raise ValueError(f"inputs have different vocabulary widths {widths}; pass vocab_size "
                             "(the shared vocabulary; wider columns are padding and are ignored)")
        vocab_size = tuned.shape[-1]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 1 or vocab_size > min(widths.values()):
        raise ValueError(f"vocab_size must be in [1, {min(widths.values())}] for widths {widths}, got {vocab_size}")

    seeds = _per_row("seeds", seeds, batch, device, integer=True)
    positions = _per_row("positions", positions, batch, device, integer=True)
    _require("positions", (positions >= 0) & (positions < _UINT32_LIMIT), "in [0, 2^32)", positions)
    temperature = _per_row("temperature", temperature, batch, device, integer=False)
    _require("temperature", torch.isfinite(temperature) & (temperature >= 0), "finite and >= 0", temperature)
    # As in vLLM, temperatures below GREEDY_TEMPERATURE mean greedy: z / T would overflow.
    temperature = torch.where(temperature < GREEDY_TEMPERATURE, torch.zeros_like(temperature), temperature)
    weight_top_p = _per_row("weight_top_p", weight_top_p, batch, device, integer=False)
    _require("weight_top_p", (weight_top_p > 0) & (weight_top_p <= 1), "in (0, 1]", weight_top_p)
    top_k = _per_row("top_k", top_k, batch, device, integer=True)
    _require("top_k", top_k >= 0, ">= 0", top_k)
    top_p = _per_row("top_p", top_p, batch, device, integer=False)
    _require("top_p", (top_p > 0) & (top_p <= 1), "in (0, 1]", top_p)

    return EFTInputs(knowledge, tuned, reference, seeds, positions, weights, temperature, weight_top_p,
                     top_k, top_p, vocab_size)
