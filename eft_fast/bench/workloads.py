"""The engine benchmark's inputs: settings, the models (synthetic family or real checkpoints)
and the three workloads (batch 1, equal-length concurrent requests, and mixed lengths), with
token-id prompts shared by every model and every column."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..engine.sampling_params import SamplingParams
from .synthetic import QUICK_SPEC, FamilySpec, build_family, family_stats, random_contexts

SPEC_KS = (2, 4, 8, 16)
TEXT_PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about the sea.", "What is a hash table?",
    "Give three tips for learning a new language.", "Summarise the plot of Hamlet in two sentences.",
    "How do vaccines work?", "Describe a sunrise over the mountains.", "What is the capital of Australia?",
    "Write a haiku about autumn leaves.", "Why do cats purr?", "Explain recursion to a child.",
    "List the planets of the solar system.", "What causes earthquakes?", "How does a bicycle stay upright?",
    "Suggest a name for a bakery.", "What is the difference between weather and climate?",
]


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of the two workloads and the sampling parameters of every column."""

    batch1_prompts: int = 2
    batch1_tokens: int = 64
    concurrent: int = 16
    concurrent_tokens: int = 32
    mixed: int = 64                              # mixed-lengths workload: requests submitted together,
    mixed_tokens: tuple[int, int] = (8, 256)    # max_tokens log-uniform in [lo, hi] (seeded)
    prompt_len: tuple[int, int] = (16, 48)      # synthetic prompts: lengths drawn in [lo, hi]
    temperature: float = 1.0
    weight_top_p: float = 0.9
    seed: int = 0


QUICK_SETTINGS = BenchSettings(batch1_prompts=1, batch1_tokens=20, concurrent=16, concurrent_tokens=20,
                               mixed=8, mixed_tokens=(4, 32), prompt_len=(4, 12))


@dataclass
class BenchModels:
    knowledge: torch.nn.Module
    tuned: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: object | None
    vocab_size: int
    description: dict


@dataclass
class Workload:
    key: str                      # "batch1" | "concurrent16" | "mixed64"
    name: str
    concurrency: int
    prompts: list[list[int]]
    max_tokens: int               # the longest request's
    lengths: list[int] | None = None   # max_tokens per request (mixed lengths); None: all max_tokens

    def max_tokens_of(self, i: int) -> int:
        return self.max_tokens if self.lengths is None else self.lengths[i]


def synthetic_models(quick: bool, dtype: torch.dtype, device: str, seed: int = 0) -> BenchModels:
    spec = QUICK_SPEC if quick else FamilySpec()
    if seed != spec.seed:
        spec = replace(spec, seed=seed)
    family = build_family(spec, dtype=dtype, device=device)
    description = family.describe()
    description["stats"] = family_stats(family, random_contexts(spec.vocab_size, 4, 64, spec.seed + 4))
    return BenchModels(family.knowledge, family.tuned, family.reference, None, spec.vocab_size, description)


def real_models(knowledge: str, tuned: str, reference: str, dtype, device: str) -> BenchModels:
    from ..engine.loading import load_model, load_tokenizer
    from ..engine.tokenization import check_same_vocabulary

    specs = {"knowledge": knowledge, "tuned": tuned, "reference": reference}
    models = {role: load_model(spec, role=role, dtype=dtype, device=device) for role, spec in specs.items()}
    tokenizers = {role: load_tokenizer(spec, role=role) for role, spec in specs.items()}
    widths = {role: int(m.config.get_text_config().vocab_size) for role, m in models.items()}
    vocab_size = check_same_vocabulary(tokenizers, widths)
    params = {role: sum(p.numel() for p in m.parameters()) for role, m in models.items()}
    description = {"kind": "pretrained", "models": specs, "parameters": params,
                   "knowledge_over_small": params["knowledge"] / params["tuned"]}
    return BenchModels(models["knowledge"], models["tuned"], models["reference"], tokenizers["tuned"], vocab_size,
                       description)


def mixed_lengths(settings: BenchSettings) -> list[int]:
    """max_tokens of the mixed workload: log-uniform in settings.mixed_tokens (long-tailed:
    most requests short, a few long), seeded."""
    gen = torch.Generator().manual_seed(settings.seed + 200)
    lo, hi = settings.mixed_tokens
    u = torch.rand(settings.mixed, generator=gen, dtype=torch.float64)
    return [int(round(lo * (hi / lo) ** float(x))) for x in u]


def make_workloads(models: BenchModels, settings: BenchSettings) -> list[Workload]:
    """The batch-1, concurrent and mixed-lengths workloads: token-id prompts, the same for
    every model."""
    n = max(settings.batch1_prompts, settings.concurrent, settings.mixed)
    if models.tokenizer is not None:
        texts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(n)]
        prompts = [list(models.tokenizer(t)["input_ids"]) for t in texts]
    else:
        gen = torch.Generator().manual_seed(settings.seed + 100)
        lo, hi = settings.prompt_len
        lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
        prompts = [torch.randint(0, models.vocab_size, (length,), generator=gen).tolist() for length in lengths]
    lengths = mixed_lengths(settings)
    return [Workload("batch1", "batch 1", 1, prompts[:settings.batch1_prompts], settings.batch1_tokens),
            Workload(f"concurrent{settings.concurrent}", f"{settings.concurrent} concurrent", settings.concurrent,
                     prompts[:settings.concurrent], settings.concurrent_tokens),
            Workload(f"mixed{settings.mixed}", f"{settings.mixed} mixed lengths", settings.mixed,
                     prompts[:settings.mixed], max(lengths), lengths)]


def sampling_params(workload: Workload, settings: BenchSettings, max_tokens: int | None = None) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens or workload.max_tokens_of(i), temperature=settings.temperature,
                           weight_top_p=settings.weight_top_p, seed=settings.seed + i, ignore_eos=True)
            for i in range(len(workload.prompts))]
