"""Loads the native extension eft_fast._C, checking first that it matches the runtime torch.

The extension links libtorch, so it must have been built against the torch it runs with.
eft_fast._build_info (a module without libtorch) says which torch that was.
"""
from __future__ import annotations

import functools
import json

import torch


class ExtensionUnavailable(ImportError):
    """The native extension is missing or was built for another torch.

    ``not_built``: True when the package was installed without a native extension at all
    (nothing to load); False when one is there but cannot be used (another torch, a missing
    symbol), which is an installation error.
    """

    def __init__(self, message: str, *, not_built: bool = False):
        super().__init__(message)
        self.not_built = not_built


def _runtime_torch_version() -> str:
    return torch.__version__.split("+")[0]


def check_torch_matches(built_with: str, runtime: str) -> None:
    """Raise ExtensionUnavailable unless the extension's torch is the runtime torch."""
    if built_with != runtime:
        raise ExtensionUnavailable(
            f"eft_fast._C was built against torch {built_with} but torch {runtime} is installed. "
            "Rebuild eft_fast against this torch: "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )


@functools.lru_cache(maxsize=1)
def build_info() -> dict:
    """The extension's build description: backends, cuda_archs, torch_version, cuda_toolkit.

    Raises ExtensionUnavailable when the extension is missing or built for another torch.
    """
    try:
        from . import _build_info  # type: ignore[attr-defined]
    except ImportError as e:
        raise ExtensionUnavailable(
            f"eft_fast's native extension is not built ({e}). Reinstall with `pip install .` "
            "(or `pip install --no-build-isolation .` to build against the torch you have).",
            not_built=True,
        ) from e
    info = json.loads(_build_info.JSON)
    check_torch_matches(info["torch_version"], _runtime_torch_version())
    try:
        from . import _C  # noqa: F401  (registers torch.ops.eft_fast.*)
    except ImportError as e:
        raise ExtensionUnavailable(f"eft_fast._C failed to load: {e}") from e
    from ._fake import register_fake_impls

    register_fake_impls()
    return info


def available() -> bool:
    try:
        build_info()
    except ExtensionUnavailable:
        return False
    return True


def has_backend(name: str) -> bool:
    return available() and name in build_info()["backends"]


def ops():
    """torch.ops.eft_fast, after loading the extension."""
    build_info()
    return torch.ops.eft_fast
