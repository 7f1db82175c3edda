"""Yield the top-level name ``kernels`` to the installed PyPI package of that name."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys


def hand_over_to_installed_kernels() -> None:
    """Load the installed ``kernels`` distribution as the module ``kernels`` (replacing this
    folder's entry in sys.modules, which the import system then returns); ImportError if it
    is not installed."""
    try:
        init = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        init = None
    if init is None or not init.is_file():
        raise ImportError("No module named 'kernels': the folder kernels/ of an eft_fast checkout is the package "
                          "eft_fast.kernels, not the PyPI package 'kernels'")
    spec = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
