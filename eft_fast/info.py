"""eft_fast.info(): versions, compiled backends, CUDA architectures, GPU and Triton availability."""
from __future__ import annotations

import importlib.util
import platform

import torch

from . import _extension


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def info() -> dict:
    """A dict describing this installation (safe to call when the extension is missing)."""
    from . import __version__

    result = {
        "eft_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "gpu_available": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": None,
        "compiled_backends": [],
        "cuda_archs": [],
        "available_backends": ["torch"],
    }
    try:
        build = _extension.build_info()
    except _extension.ExtensionUnavailable as e:
        result["extension"] = f"unavailable: {e}"
    else:
        result["extension"] = f"built against torch {build['torch_version']}"
        result["compiled_backends"] = build["backends"]
        result["cuda_archs"] = build["cuda_archs"]
        result["available_backends"].append("cpu")
        if "cuda" in build["backends"] and torch.cuda.is_available():
            result["available_backends"].append("cuda")
    if result["triton"] is not None and torch.cuda.is_available():
        result["available_backends"].append("triton")
    result["auto_backend"] = {}           # what backend="auto" picks per device type
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        try:
            import warnings

            from .ops import auto_backend

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result["auto_backend"][device] = auto_backend(torch.device(device))
        except ImportError as e:
            result["auto_backend"][device] = f"error: {e}"
    return result
