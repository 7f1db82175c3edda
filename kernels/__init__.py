"""Triton kernels of eft_fast (JIT-compiled; without a GPU they run under TRITON_INTERPRET=1)."""
