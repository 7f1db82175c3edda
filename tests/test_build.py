"""The native extension's build: backends, CUDA sources, and the torch-version guard."""
import os
import shutil

import pytest
import torch

import eft_fast
from eft_fast import _extension


def test_extension_matches_runtime_torch_and_lists_backends():
    info = eft_fast.info()
    assert "cpu" in info["compiled_backends"], info["extension"]
    assert info["extension"] == f"built against torch {torch.__version__.split('+')[0]}"


@pytest.mark.skipif(torch.version.cuda is None or (shutil.which("nvcc") is None and
                                                  not os.path.exists("/usr/local/cuda/bin/nvcc")),
                    reason="CUDA sources are built only with a CUDA torch and nvcc")
def test_cuda_sources_were_compiled():
    info = eft_fast.info()
    assert "cuda" in info["compiled_backends"]
    assert info["cuda_archs"], "no CUDA architectures recorded"


def test_torch_mismatch_is_a_clear_import_error():
    with pytest.raises(ImportError, match="built against torch 2.0.0 but torch 2.14.1 is installed"):
        _extension.check_torch_matches("2.0.0", "2.14.1")
    _extension.check_torch_matches("2.14.1", "2.14.1")


def test_python_started_in_the_checkout_root_still_imports_transformers():
    """The checkout's top-level kernels/ folder (the package eft_fast.kernels) must not hide the
    PyPI package `kernels` that transformers imports when Python runs in the root (`python -c`,
    `python -m` put the working directory first on sys.path)."""
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    script = ("from transformers import LlamaConfig, LlamaForCausalLM\n"
              "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
              " num_attention_heads=2, vocab_size=64))\n"
              "import kernels, eft_fast.kernels.eft_sample\n"
              "print(kernels.__file__)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    try:
        distribution("kernels")
    except PackageNotFoundError:
        assert "eft_fast.kernels, not the PyPI package" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    imported = Path(done.stdout.strip().splitlines()[-1]).resolve()
    assert imported != (root / "kernels" / "__init__.py").resolve() and "site-packages" in imported.parts
