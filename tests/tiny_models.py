"""Tiny random-init Hugging Face models for tests (no downloads)."""
from __future__ import annotations

import copy

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),            # q/k/v biases, GQA
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
}


def tiny_model(arch: str = "llama", vocab_size: int = 97, dtype: torch.dtype = torch.float32, seed: int = 0,
               **overrides) -> torch.nn.Module:
    """A random-init causal LM of ``arch`` in eval mode (deterministic given ``seed``)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(vocab_size=vocab_size, **{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    if arch == "qwen2":  # default init zeroes biases; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    return model


def twin(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """An independent copy of ``model`` (own config object) with HF's own attention."""
    other = copy.deepcopy(model)
    other.config._attn_implementation = attn_implementation
    return other


@torch.no_grad()
def dense_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """HF's own no-cache forward over one sequence: [len(token_ids), vocab]."""
    return model(torch.tensor([token_ids]), use_cache=False).logits[0]
