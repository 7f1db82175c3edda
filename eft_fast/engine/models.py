"""The engine's models: roles, loading, shared tokenizer, prompt formats and EOS ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loading import load_model, load_tokenizer
from .sampler import Roles
from .tokenization import PromptFormat, check_same_vocabulary


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _key(spec):
    return ("object", id(spec)) if isinstance(spec, torch.nn.Module) else ("spec", str(spec))


def _assign_roles(knowledge, tuned, reference) -> tuple[list, list[str], Roles]:
    """Unique model specs, their role names, and the roles as indices into them."""
    tuned, reference = _as_list(tuned), _as_list(reference)
    if knowledge is None and not tuned:
        if reference:
            raise ValueError("reference given without a tuned model: pass tuned=...")
        raise ValueError("give at least one model: knowledge=..., tuned=... (and reference=... for EFT)")
    if knowledge is not None and not tuned:
        if reference:
            raise ValueError("reference given without a tuned model: pass tuned=...")
        tuned, knowledge = [knowledge], None              # a single model, sampled by itself
        names = ["knowledge"]
    else:
        names = ["tuned"] if len(tuned) == 1 else [f"tuned[{i}]" for i in range(len(tuned))]
    if len(tuned) > 1 and not reference:
        raise ValueError("reward interpolation (several tuned models) needs reference=...")
    if knowledge is not None and not reference:
        raise ValueError("EFT with a knowledge model needs reference=... (the tuned model's pre-trained base)")
    if reference and len(reference) not in (1, len(tuned)):
        raise ValueError(f"reference must be one model or one per tuned model ({len(tuned)}), got {len(reference)}")
    specs, roles_named = [], []
    ordered = ([("knowledge", knowledge)] if knowledge is not None else []) + list(zip(names, tuned)) + \
        [("reference" if len(reference) == 1 else f"reference[{i}]", r) for i, r in enumerate(reference)]
    index: dict = {}
    for name, spec in ordered:
        if spec is None:
            raise ValueError(f"{name} is None")
        if _key(spec) not in index:
            index[_key(spec)] = len(specs)
            specs.append(spec)
            roles_named.append(name)
    roles = Roles(knowledge=None if knowledge is None else index[_key(knowledge)],
                  tuned=tuple(index[_key(t)] for t in tuned),
                  reference=tuple(index[_key(r)] for r in reference))
    return specs, roles_named, roles


def check_roles(knowledge, tuned, reference, prompt_format) -> None:
    """The role and prompt-format checks of :meth:`EngineModels.load`, without loading anything."""
    _, names, roles = _assign_roles(knowledge, tuned, reference)
    _formats(prompt_format, names, roles)


@dataclass
class EngineModels:
    """models[m], names[m] (role name), tokenizers[m] and formats[m] per unique model."""

    models: list
    names: list[str]
    tokenizers: list
    formats: list[PromptFormat]
    roles: Roles
    vocab_size: int
    tokenizer: object | None
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, knowledge, tuned, reference, *, tokenizer=None, dtype=None, device=None,
             prompt_format=None, knowledge_kwargs: dict | None = None) -> "EngineModels":
        """Load every model; ``knowledge_kwargs`` go to the knowledge model's ``from_pretrained``
        (a tensor-parallel plan, which also decides its device)."""
        specs, names, roles = _assign_roles(knowledge, tuned, reference)
        models = []
        for m, (spec, name) in enumerate(zip(specs, names)):
            extra = (knowledge_kwargs or {}) if m == roles.knowledge else {}
            models.append(load_model(spec, role=name, dtype=dtype, device=None if extra else device, **extra))
        devices = {next(m.parameters()).device for m in models}
        if len(devices) > 1:
            raise ValueError(f"the models are on different devices ({sorted(map(str, devices))}); pass device=...")
        if tokenizer is not None:
            tokenizers = [tokenizer] * len(models)
        else:
            tokenizers = [load_tokenizer(spec, role=name) for spec, name in zip(specs, names)]
        widths = {name: int(m.config.get_text_config().vocab_size) for m, name in zip(models, names)}
        if any(t is not None for t in tokenizers):
            vocab_size = check_same_vocabulary(dict(zip(names, tokenizers)), widths)
        elif len(set(widths.values())) == 1:
            vocab_size = next(iter(widths.values()))
        else:
            raise ValueError(f"the models' vocabulary widths differ ({widths}) and there is no tokenizer to "
                             "check them by token id: pass tokenizer=...")
        primary = roles.tuned[0]
        shared = tokenizers[primary] if tokenizers[primary] is not None else \
            next((t for t in tokenizers if t is not None), None)
        tokenizers = [t if t is not None else shared for t in tokenizers]
        formats = _formats(prompt_format, names, roles)
        eos = set()
        if shared is not None and shared.eos_token_id is not None:
            eos.add(int(shared.eos_token_id))
        gen_eos = getattr(getattr(models[primary], "generation_config", None), "eos_token_id", None)
        eos.update(int(e) for e in _as_list(gen_eos))
        return cls(models, names, tokenizers, formats, roles, vocab_size, shared, frozenset(eos))


def _formats(prompt_format, names: list[str], roles: Roles) -> list[PromptFormat]:
    """Default: tuned models "auto" (their chat template if they have one), base models "plain"."""
    tuned = set(roles.tuned)
    defaults = [PromptFormat("auto") if m in tuned else PromptFormat("plain") for m in range(len(names))]
    if prompt_format is None:
        return defaults
    if isinstance(prompt_format, dict):
        unknown = set(prompt_format) - set(names)
        if unknown:
            raise ValueError(f"prompt_format has unknown roles {sorted(unknown)}; the models are {names}")
        return [PromptFormat.from_spec(prompt_format[n]) if n in prompt_format else d
                for n, d in zip(names, defaults)]
    fmt = PromptFormat.from_spec(prompt_format)
    return [fmt] * len(names)
