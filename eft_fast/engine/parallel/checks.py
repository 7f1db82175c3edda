"""Checks of a tensor-parallel configuration, run before any weights load."""
from __future__ import annotations

import os

import torch


def check_tensor_parallel(tp_size, knowledge, *, device: torch.device | None, other_specs: list) -> None:
    """Raise ValueError / TypeError naming the model and the numbers if ``knowledge`` cannot be
    sharded over ``tp_size`` ranks. ``knowledge`` must be a path or hub id (each rank loads its
    own slices), distinct from the tuned and reference models, with a tensor-parallel plan and
    head counts divisible by ``tp_size``; on CUDA, ``tp_size`` GPUs must be visible."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {tp_size!r}")
    if tp_size == 1:
        return
    if knowledge is None:
        raise ValueError(f"tensor_parallel_size={tp_size} shards the knowledge model, but none was given")
    if isinstance(knowledge, torch.nn.Module):
        raise ValueError(f"tensor_parallel_size={tp_size} needs the knowledge model as a path or hub id (every rank "
                         "loads its own slices), not a model already loaded in this process")
    if not isinstance(knowledge, (str, os.PathLike)):
        raise TypeError(f"knowledge must be a path or hub id with tensor_parallel_size > 1, "
                        f"got {type(knowledge).__name__}")
    if any(isinstance(o, (str, os.PathLike)) and os.fspath(o) == os.fspath(knowledge) for o in other_specs):
        raise ValueError(f"tensor_parallel_size={tp_size}: the knowledge model {os.fspath(knowledge)!r} is also a "
                         "tuned or reference model; only a knowledge model of its own can be sharded")
    if device is not None and device.type == "cuda":
        if device.index not in (None, 0):
            raise ValueError(f"device={str(device)!r} with tensor_parallel_size={tp_size}: rank r runs on cuda:r, so "
                             "give device='cuda' (the ranks use cuda:0 .. cuda:N-1; pick them with "
                             "CUDA_VISIBLE_DEVICES)")
        visible = torch.cuda.device_count()
        if tp_size > visible:
            raise ValueError(f"tensor_parallel_size={tp_size} needs {tp_size} GPUs, but {visible} are visible")
    from ..loading import load_config

    config = load_config(knowledge, role="knowledge")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = f"the knowledge model {os.fspath(knowledge)!r} ({type(config).__name__})"
    if not getattr(text, "base_model_tp_plan", None):
        raise ValueError(f"{name} has no tensor-parallel plan in transformers, so it cannot be sharded")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for what, n in (("attention heads", heads), ("KV heads", kv_heads)):
        if n % tp_size:
            raise ValueError(f"{name} has {n} {what}, not divisible by tensor_parallel_size={tp_size}")
