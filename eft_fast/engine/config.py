"""Engine configuration: one dataclass, checked in ``__post_init__``."""
from __future__ import annotations

from dataclasses import dataclass

ACCEPT_MODES = ("exact", "rejection")


def _positive_int(name: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")


@dataclass
class EngineConfig:
    """Scheduling and cache settings shared by every model of an engine.

    speculative_k: draft tokens per round (0 = no speculation), or "auto": each round picks its
        draft length in {0, 1, 2, 4, 8} from the running acceptance rate and the measured cost
        of rounds at the current batch size (adaptive_k.py; exact acceptance only).
    accept: "exact" (token-identical to k = 0) or "rejection" (Leviathan et al.).
    block_size: tokens per KV block.
    max_num_seqs: the most requests decoding at once (also the largest CUDA-graph bucket).
    max_num_batched_tokens: the most tokens one step computes per model (prompt chunks and,
        with chunked prefill, decode tokens); without chunked prefill a longer prompt is
        prefilled whole in a step of its own.
    num_blocks / kv_cache_bytes: KV pool size per model (blocks, or a byte budget).
    max_model_len: context cap for every model (default: each model's own limit).
    use_cuda_graph: capture decode/verify steps (default: on for CUDA models).
    backend: the eft_sample backend ("auto", "cpu", "cuda", "triton", "torch").
    tensor_parallel_size: ranks the knowledge model is sharded over (1 = not sharded).
    distributed_timeout_s: the timeout of every collective of a tensor-parallel group.
    enable_prefix_caching: reuse the KV blocks of prompt (and output) prefixes already computed,
        per model (see scheduler.py).
    enable_chunked_prefill: split prompts into chunks that share steps with decode tokens,
        at most ``max_num_batched_tokens`` tokens per model and step (see scheduler.py).
    """

    speculative_k: int | str = 0
    accept: str = "exact"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_model_len: int | None = None
    use_cuda_graph: bool | None = None
    backend: str = "auto"
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 300.0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        if self.speculative_k != "auto":
            try:
                _positive_int("speculative_k", self.speculative_k, allow_zero=True)
            except ValueError:
                raise ValueError(f"speculative_k must be a non-negative int or 'auto', got {self.speculative_k!r}") \
                    from None
        if self.accept not in ACCEPT_MODES:
            raise ValueError(f"accept must be one of {ACCEPT_MODES}, got {self.accept!r}")
        if self.speculative_k == "auto" and self.accept != "exact":
            raise ValueError("speculative_k='auto' needs accept='exact': rejection sampling's samples depend on "
                             "the draft length, so an adaptive one would make them depend on timing")
        _positive_int("block_size", self.block_size)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("num_blocks", self.num_blocks, allow_none=True)
        _positive_int("kv_cache_bytes", self.kv_cache_bytes, allow_none=True)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        if self.use_cuda_graph is not None and not isinstance(self.use_cuda_graph, bool):
            raise TypeError(f"use_cuda_graph must be a bool or None, got {self.use_cuda_graph!r}")
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if isinstance(self.distributed_timeout_s, bool) or not isinstance(self.distributed_timeout_s, (int, float)) \
                or not self.distributed_timeout_s > 0:
            raise ValueError(f"distributed_timeout_s must be a positive number, got {self.distributed_timeout_s!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        from ..ops import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def adaptive_speculation(self) -> bool:
        """speculative_k == "auto"."""
        return self.speculative_k == "auto"

    @property
    def max_draft_len(self) -> int:
        """The longest draft of a round (KV room is reserved for it): k, or 8 for "auto"."""
        from .adaptive_k import AUTO_MAX_K

        return AUTO_MAX_K if self.adaptive_speculation else self.speculative_k
