"""Triton kernels of eft_fast (JIT-compiled; without a GPU they run under TRITON_INTERPRET=1).

Installed as ``eft_fast.kernels``. In a source checkout this folder also sits at the top level,
so Python started in the checkout's root (which puts the root on sys.path) would find it under
the name ``kernels``, hiding the PyPI package ``kernels`` that transformers imports. Imported
under that name, it hands the name to the installed package (see _shadowed.py).
"""
if __name__ == "kernels":
    from ._shadowed import hand_over_to_installed_kernels

    hand_over_to_installed_kernels()
