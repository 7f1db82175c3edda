"""eft_fast: fused kernels and a paged, speculative engine for emulated fine-tuning (EFT) decoding.

    tokens, logprob = eft_fast.eft_sample(knowledge, tuned, reference, seeds, positions)

See DESIGN.md section 8 for the public API.
"""
from .info import info
from .ops import BACKENDS, EFTRowError, eft_sample
from .reference import eft_sample_reference

__version__ = "0.1.0"

__all__ = ["BACKENDS", "EFTRowError", "eft_sample", "eft_sample_reference", "info", "__version__"]
