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
