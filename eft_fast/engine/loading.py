"""Load the engine's models and tokenizers from what a user names: a Hugging Face hub id,
a local directory, a local ``.gguf`` file, or an object already in memory.

Every failure is a ``ValueError`` (``TypeError`` for a wrong argument type) naming the role
("knowledge", "tuned", "reference", "tuned[1]", ...) and the spec, so a user of a three-model
engine knows which argument to fix. A spec that looks like a local path and does not exist fails
at once, before any network access; a bare hub id is looked up in the local cache first and only
then on the hub (skipped in offline mode, ``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import is_accelerate_available

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# from_pretrained arguments that say where files come from (the rest configure the model).
_HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "trust_remote_code", "force_download", "proxies")


def parse_dtype(dtype) -> torch.dtype | str | None:
    """None, "auto", a torch floating dtype or its name ("float32", "bf16", ...) -> torch.dtype,
    "auto" or None. Anything else is a ``ValueError`` / ``TypeError`` naming ``dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _MODEL_DTYPES:
        return dtype
    if isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, float16, float64), got {dtype}")
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPES:
            return _DTYPES[name]
        raise ValueError(f"dtype must be one of 'auto', {', '.join(repr(k) for k in _DTYPES)} "
                         f"or a torch dtype, got {dtype!r}")
    raise TypeError(f"dtype must be a torch.dtype, a string or None, got {type(dtype).__name__}")


def parse_device(device) -> torch.device | None:
    """None, a str, torch.device or CUDA index -> torch.device or None. A CUDA device that
    this machine does not have is a ``ValueError`` naming ``device``, before anything loads."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"device must be a str, torch.device, int or None, got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return parsed


def _check_role(role) -> str:
    if not isinstance(role, str) or not role:
        raise TypeError(f"role must be a non-empty str, got {role!r}")
    return role


def _is_offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def _resolve(spec, role: str, gguf_file: str | None) -> tuple[str, str | None, bool]:
    """spec -> (name for from_pretrained, gguf file name or None, is_local).

    A spec that exists on disk is local. One that does not exist but looks like a path
    (starts with / . ~, or is not a valid hub id, e.g. has two slashes) fails at once.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"{role}: expected a hub id, a local path or a PreTrainedModel, "
                        f"got {type(spec).__name__}")
    if gguf_file is not None and (not isinstance(gguf_file, str) or not gguf_file):
        raise TypeError(f"{role}: gguf_file must be a non-empty str or None, got {gguf_file!r}")
    if not spec.strip():
        raise ValueError(f"{role}: the model spec is an empty string")
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), gguf_file, True
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{role}: {spec!r} is a file but not a .gguf file; pass the model's "
                             f"directory, a .gguf file or a hub id")
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"{role}: {spec!r} is a .gguf file but gguf_file={gguf_file!r} names another")
        return str(path.parent), path.name, True
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.lower().endswith(".gguf")
    if not looks_like_path:
        try:
            validate_repo_id(spec)
        except HFValidationError:
            looks_like_path = True
    if looks_like_path:
        raise ValueError(f"{role}: {spec!r} does not exist (no such file or directory) "
                         f"and is not a Hugging Face hub id")
    return spec, gguf_file, False


def _from_pretrained(loader, name: str, *, role: str, spec: str, is_local: bool, what: str, **kwargs):
    """loader.from_pretrained(name), local files first; a hub id goes to the hub only if that
    fails and the hub is not switched off. Failures become a ValueError naming role and spec,
    with the original error as its cause."""
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError as e:
        if is_local or _is_offline():
            where = "from the local directory" if is_local else "from the local cache (offline mode: hub not tried)"
            raise ValueError(f"{role}: could not load the {what} of {spec!r} {where}: {e}") from e
    except (ValueError, KeyError) as e:
        raise ValueError(f"{role}: could not load the {what} of {spec!r}: {e}") from e
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        raise ValueError(f"{role}: could not load the {what} of {spec!r}: not in the local cache, and the "
                         f"Hugging Face hub did not provide it: {e}") from e
    except (ValueError, KeyError) as e:
        raise ValueError(f"{role}: could not load the {what} of {spec!r}: {e}") from e


def _config_is_causal_lm(config) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    auto_map = getattr(config, "auto_map", None) or {}
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in auto_map


def _is_causal_lm(model: PreTrainedModel) -> bool:
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(model.config, "model_type", None), ())
    names = (names,) if isinstance(names, str) else tuple(names)
    if type(model).__name__ in names:
        return True
    # Classes from remote code or subclasses: a generating model with an LM head.
    return isinstance(model, GenerationMixin) and model.get_output_embeddings() is not None


def _not_causal(role: str, what: str) -> ValueError:
    return ValueError(f"{role}: {what} is not a causal language model; EFT needs next-token logits "
                      f"(an ...ForCausalLM model)")


def load_config(spec, *, role: str):
    """The config of a model named by a path, hub id or ``.gguf`` file, without its weights."""
    role = _check_role(role)
    name, gguf_name, is_local = _resolve(spec, role, None)
    kwargs = {"gguf_file": gguf_name} if gguf_name is not None else {}
    return _from_pretrained(AutoConfig, name, role=role, spec=spec, is_local=is_local, what="config", **kwargs)


def load_model(spec, *, role: str, dtype=None, device=None, gguf_file: str | None = None,
               **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load one causal LM for the engine, in eval mode.

    Args:
        spec: a hub id ("org/name"), a local directory, a local ``.gguf`` file, or a
            ``PreTrainedModel`` (returned as is, moved only if ``dtype`` / ``device`` are given).
        role: the engine argument this model came from ("knowledge", "tuned[1]", ...), used in errors.
        dtype: None (transformers' default), "auto", a torch floating dtype or its name
            ("float32", "bfloat16", "float16", "float64").
        device: where the weights go (str, torch.device or CUDA index); None leaves transformers' default (CPU).
        gguf_file: the ``.gguf`` file name inside a directory or hub repo given as ``spec``.
        from_pretrained_kwargs: passed on to ``from_pretrained`` (revision, attn_implementation, ...).
    """
    role = _check_role(role)
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    if isinstance(spec, torch.nn.Module):
        if not isinstance(spec, PreTrainedModel):
            raise TypeError(f"{role}: expected a transformers PreTrainedModel, got {type(spec).__name__}")
        if not _is_causal_lm(spec):
            raise _not_causal(role, f"the given {type(spec).__name__}")
        if isinstance(dtype, torch.dtype) or device is not None:
            spec = spec.to(**({"dtype": dtype} if isinstance(dtype, torch.dtype) else {}),
                           **({"device": device} if device is not None else {}))
        return spec.eval()

    name, gguf_name, is_local = _resolve(spec, role, gguf_file)
    kwargs = dict(from_pretrained_kwargs)
    if gguf_name is not None:
        kwargs["gguf_file"] = gguf_name
    else:
        # Reading a GGUF header is slow (its tokenizer tables), so GGUF models skip this
        # early check and are checked once loaded.
        hub_kwargs = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        config = _from_pretrained(AutoConfig, name, role=role, spec=spec, is_local=is_local,
                                  what="config", **hub_kwargs)
        if not _config_is_causal_lm(config):
            raise _not_causal(role, f"{spec!r} (model type {config.model_type!r})")
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device is not None and is_accelerate_available():
        kwargs["device_map"] = device  # straight to the device, no copy in host memory first
    try:
        model = _from_pretrained(AutoModelForCausalLM, name, role=role, spec=spec, is_local=is_local,
                                 what="weights", **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e.__cause__):
            raise _not_causal(role, f"{spec!r} (no causal-LM class for its config)") from e.__cause__
        raise
    if not _is_causal_lm(model):
        raise _not_causal(role, f"{spec!r} (class {type(model).__name__})")
    if device is not None and "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def load_tokenizer(spec, *, role: str, gguf_file: str | None = None, **from_pretrained_kwargs: Any):
    """Load the tokenizer that goes with a model spec (same forms as :func:`load_model`).

    For an already-loaded model, its ``name_or_path`` is tried; if that does not resolve to a
    tokenizer, the result is None and the caller must pass a tokenizer. Otherwise a spec that
    cannot be loaded is a ``ValueError`` naming ``role`` and the spec.
    """
    role = _check_role(role)
    if isinstance(spec, torch.nn.Module):
        name = getattr(spec, "name_or_path", "") or ""
        if not name:
            return None
        try:
            return load_tokenizer(name, role=role, gguf_file=gguf_file, **from_pretrained_kwargs)
        except (ValueError, TypeError):
            return None
    name, gguf_name, is_local = _resolve(spec, role, gguf_file)
    kwargs = dict(from_pretrained_kwargs)
    if gguf_name is not None:
        kwargs["gguf_file"] = gguf_name
    return _from_pretrained(AutoTokenizer, name, role=role, spec=spec, is_local=is_local,
                            what="tokenizer", **kwargs)
