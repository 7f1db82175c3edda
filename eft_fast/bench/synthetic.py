"""A synthetic EFT model family, built in-process from a seed (no downloads).

Three real ``LlamaForCausalLM`` models with random weights, arranged the way a real family
relates (the engine benchmark's default models; nothing here is trained):

* **reference** (small base): random init (transformers' default, normal with std 0.02),
  then its ``lm_head`` is multiplied by one scalar, found by bisection, so that on random
  contexts the mean top-1 next-token probability is ``top1_target`` (0.6 by default): peaked
  like a real LM's, not the near-uniform output of a random init.
* **tuned** (small fine-tuned): the reference with every weight matrix perturbed,
  ``W + tuned_noise * std(W) * N(0, 1)``: a small behaviour change of the same model.
* **knowledge** (large base, about 9x the parameters): a wider and deeper Llama that holds
  the reference inside it. Its first ``small_hidden`` residual dimensions, first heads and
  first MLP channels of its first ``small_layers`` layers carry the reference's weights (norm
  gains rescaled by sqrt(small_hidden / knowledge_hidden) and the norm epsilon by
  small_hidden / knowledge_hidden, so RMSNorm over the wider stream gives the same values).
  Every other weight is a fresh random init, and every weight by which the extra capacity
  (extra heads, channels, dimensions and layers) writes into the residual stream is scaled
  by ``knowledge_residual``; its output projection reads the extra dimensions at the
  reference's output scale. Its logits are the reference's plus a residual that grows with
  ``knowledge_residual`` (0 gives the reference's logits exactly), as a large and a small
  base model of one family agree on most easy tokens and differ on some.

So the EFT up-weight ``l_K - l_R`` is small on most tokens, the small tuned model (the draft of
speculative EFT) often agrees with the EFT target, and the knowledge model costs what a
Llama of its size costs. Acceptance rates measured on this family depend on the two noise
scales; the benchmark reports them next to every speed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class FamilySpec:
    """Sizes and noise scales of a synthetic family (defaults: 7.1M-parameter small models
    and a 64.5M-parameter knowledge model, vocabulary 8192)."""

    vocab_size: int = 8192
    small_hidden: int = 256
    small_layers: int = 4
    small_intermediate: int = 704
    knowledge_hidden: int = 768
    knowledge_layers: int = 8
    knowledge_intermediate: int = 2048
    head_dim: int = 64
    kv_group: int = 2                 # query heads per KV head (GQA), the same in every model
    max_position_embeddings: int = 1024
    top1_target: float = 0.6          # mean top-1 probability the reference's output scale is set to
    tuned_noise: float = 0.02         # tuned = reference + tuned_noise * std(W) * N(0, 1) per matrix
    knowledge_residual: float = 0.01  # scale of every write of the knowledge model's extra capacity
    seed: int = 0

    def __post_init__(self):
        for name in ("small_hidden", "knowledge_hidden"):
            width = getattr(self, name)
            if width % (self.head_dim * self.kv_group):
                raise ValueError(f"{name}={width} must be a multiple of head_dim * kv_group = "
                                 f"{self.head_dim * self.kv_group}")
        if self.knowledge_hidden < self.small_hidden or self.knowledge_layers < self.small_layers or \
                self.knowledge_intermediate < self.small_intermediate:
            raise ValueError("the knowledge model must be at least as wide, deep and broad as the small ones")
        if not 0 < self.top1_target < 1:
            raise ValueError(f"top1_target must be in (0, 1), got {self.top1_target}")


RMS_NORM_EPS = 1e-6

# The --quick family: tiny, so a whole benchmark run takes seconds.
QUICK_SPEC = FamilySpec(vocab_size=512, small_hidden=64, small_layers=2, small_intermediate=128,
                        knowledge_hidden=192, knowledge_layers=4, knowledge_intermediate=384, head_dim=32)


@dataclass
class SyntheticFamily:
    knowledge: LlamaForCausalLM
    tuned: LlamaForCausalLM
    reference: LlamaForCausalLM
    spec: FamilySpec
    output_scale: float               # the factor applied to the reference's random lm_head

    def describe(self) -> dict:
        params = {name: sum(p.numel() for p in getattr(self, name).parameters())
                  for name in ("knowledge", "tuned", "reference")}
        return {"kind": "synthetic", "spec": asdict(self.spec), "output_scale": self.output_scale,
                "parameters": params, "knowledge_over_small": params["knowledge"] / params["tuned"]}


def _config(spec: FamilySpec, hidden: int, layers: int, intermediate: int) -> LlamaConfig:
    heads = hidden // spec.head_dim
    # RMSNorm's epsilon scaled like the mean square of a stream that is the small model's stream
    # padded with (near) zeros, so that the embedded small model computes the same norms.
    eps = RMS_NORM_EPS * spec.small_hidden / hidden
    return LlamaConfig(rms_norm_eps=eps, vocab_size=spec.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=heads // spec.kv_group, head_dim=spec.head_dim,
                       max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=None)


def _random_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def calibrate_output_scale(model: LlamaForCausalLM, contexts: torch.Tensor, target: float) -> float:
    """The factor for ``lm_head`` that makes the mean top-1 probability ``target`` (bisection
    in log space; the top-1 probability of softmax(c x) grows with c)."""
    hidden = model.model(contexts, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).float()
    low, high = -4.0, 12.0                                    # log2 of the scale
    for _ in range(40):
        mid = (low + high) / 2
        if float((logits * 2 ** mid).softmax(-1).amax(-1).mean()) < target:
            low = mid
        else:
            high = mid
    return 2 ** ((low + high) / 2)


@torch.no_grad()
def perturb(model: LlamaForCausalLM, noise: float, seed: int) -> LlamaForCausalLM:
    """A copy of ``model`` with every weight matrix W replaced by W + noise * std(W) * N(0, 1)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for p in out.parameters():
        if p.dim() == 2:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (noise * float(p.std())))
    return out


@torch.no_grad()
def embed_small_in_large(small: LlamaForCausalLM, large: LlamaForCausalLM, residual: float) -> None:
    """Write ``small``'s weights into the leading blocks of the random-init ``large`` (see the
    module docstring); scale what the extra capacity writes into the residual stream by
    ``residual``. In place."""
    hs, hl = small.config.hidden_size, large.config.hidden_size
    d = small.config.head_dim
    q_rows = small.config.num_attention_heads * d
    kv_rows = small.config.num_key_value_heads * d
    inter = small.config.intermediate_size
    gain = math.sqrt(hs / hl)           # RMS over hl dims of a stream whose extra dims are ~0

    large.model.embed_tokens.weight[:, hs:] *= residual
    large.model.embed_tokens.weight[:, :hs] = small.model.embed_tokens.weight
    for i, layer in enumerate(large.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj.weight *= residual
        mlp.down_proj.weight *= residual
        if i >= len(small.model.layers):
            continue
        src = small.model.layers[i]
        for norm, src_norm in ((layer.input_layernorm, src.input_layernorm),
                               (layer.post_attention_layernorm, src.post_attention_layernorm)):
            norm.weight.fill_(gain)
            norm.weight[:hs] = src_norm.weight * gain
        attn.q_proj.weight[:q_rows, :hs] = src.self_attn.q_proj.weight
        attn.k_proj.weight[:kv_rows, :hs] = src.self_attn.k_proj.weight
        attn.v_proj.weight[:kv_rows, :hs] = src.self_attn.v_proj.weight
        attn.o_proj.weight[:hs, :q_rows] = src.self_attn.o_proj.weight
        mlp.gate_proj.weight[:inter, :hs] = src.mlp.gate_proj.weight
        mlp.up_proj.weight[:inter, :hs] = src.mlp.up_proj.weight
        mlp.down_proj.weight[:hs, :inter] = src.mlp.down_proj.weight
    large.model.norm.weight.fill_(gain)
    large.model.norm.weight[:hs] = small.model.norm.weight * gain
    large.lm_head.weight[:, :hs] = small.lm_head.weight
    large.lm_head.weight[:, hs:] *= float(small.lm_head.weight.std()) / float(large.lm_head.weight[:, hs:].std())


def random_contexts(vocab_size: int, num: int, length: int, seed: int) -> torch.Tensor:
    """[num, length] int64 token ids, uniform over the vocabulary."""
    return torch.randint(0, vocab_size, (num, length), generator=torch.Generator().manual_seed(seed))


def build_family(spec: FamilySpec = FamilySpec(), dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> SyntheticFamily:
    """Build the knowledge, tuned and reference models of ``spec`` (deterministic in ``spec.seed``)."""
    reference = _random_llama(_config(spec, spec.small_hidden, spec.small_layers, spec.small_intermediate),
                              spec.seed)
    scale = calibrate_output_scale(reference, random_contexts(spec.vocab_size, 8, 64, spec.seed + 1),
                                   spec.top1_target)
    with torch.no_grad():
        reference.lm_head.weight *= scale
    tuned = perturb(reference, spec.tuned_noise, spec.seed + 2)
    knowledge = _random_llama(_config(spec, spec.knowledge_hidden, spec.knowledge_layers,
                                      spec.knowledge_intermediate), spec.seed + 3)
    embed_small_in_large(reference, knowledge, spec.knowledge_residual)
    models = [m.to(dtype=dtype, device=device).eval() for m in (knowledge, tuned, reference)]
    return SyntheticFamily(*models, spec=spec, output_scale=scale)


@torch.no_grad()
def family_stats(family: SyntheticFamily, contexts: torch.Tensor) -> dict:
    """How the family's next-token distributions relate on ``contexts`` [N, L] (every position):
    mean top-1 probability per model, how often two models' argmax agree, and how often the
    EFT target's argmax (weight_top_p = 1: l_T + l_K - l_R) agrees with the tuned model's, and
    how often temperature-1 samples of the two agree under shared Gumbel noise (what exact
    speculative decoding accepts, one token at a time)."""
    device = next(family.tuned.parameters()).device
    contexts = contexts.to(device)
    logp = {name: getattr(family, name)(contexts, use_cache=False).logits.float().log_softmax(-1)
            for name in ("knowledge", "tuned", "reference")}
    eft = logp["tuned"] + logp["knowledge"] - logp["reference"]
    top = {name: lp.argmax(-1) for name, lp in logp.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    coupled = []
    for _ in range(8):     # T = 1 samples of the draft and the target with the same Gumbel noise
        noise = -torch.log(-torch.log(torch.rand(eft.shape, generator=gen, device=device).clamp_min(1e-20)))
        coupled.append(((logp["tuned"] + noise).argmax(-1) == (eft + noise).argmax(-1)).float().mean())

    def agree(a, b):
        return float((a == b).float().mean())

    return {
        "contexts": list(contexts.shape),
        "mean_top1_probability": {name: float(lp.exp().amax(-1).mean()) for name, lp in logp.items()},
        "argmax_agreement": {"knowledge_reference": agree(top["knowledge"], top["reference"]),
                             "tuned_reference": agree(top["tuned"], top["reference"]),
                             "eft_tuned": agree(eft.argmax(-1), top["tuned"])},
        "draft_target_agreement_t1": float(torch.stack(coupled).mean()),
    }
