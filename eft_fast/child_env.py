"""The environment of the Python child processes that eft_fast starts with ``python -m``."""
from __future__ import annotations

import os


def child_python_env(**extra: str) -> dict[str, str]:
    """os.environ plus ``extra`` and PYTHONSAFEPATH=1 (Python >= 3.11), so that a ``python -m``
    child does not put its working directory first on sys.path. In a checkout of this project
    that directory holds the top-level ``kernels/`` folder (installed as ``eft_fast.kernels``),
    which would shadow the PyPI package ``kernels`` that transformers imports."""
    return {**os.environ, "PYTHONSAFEPATH": "1", **extra}
