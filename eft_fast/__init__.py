"""eft_fast: fused kernels and a paged, speculative engine for emulated fine-tuning (EFT) decoding.

    tokens, logprob = eft_fast.eft_sample(knowledge, tuned, reference, seeds, positions)

See docs/DESIGN.md section 8 for the public API.
"""
from .info import info
from .ops import BACKENDS, EFTRowError, eft_sample
from .reference import eft_sample_reference

__version__ = "0.1.0"

_ENGINE_NAMES = {"EFTEngine": "engine", "SamplingParams": "sampling_params", "RequestOutput": "outputs",
                 "RequestMetrics": "outputs", "StreamDelta": "outputs"}

__all__ = ["BACKENDS", "EFTRowError", "eft_sample", "eft_sample_reference", "info", "__version__",
           *_ENGINE_NAMES]


def __getattr__(name):
    # The engine pulls in transformers; users of the op alone do not pay for that import.
    if name in _ENGINE_NAMES:
        import importlib

        return getattr(importlib.import_module(f".engine.{_ENGINE_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'eft_fast' has no attribute {name!r}")
