"""The engine's host work per decode step, apart from the models' forwards and the sampling op.

    eft-fast bench --host-overhead [--quick] [--device D] [--threads N] [--out DIR]

On a GPU a decode step of a 7B model takes a few milliseconds, so the engine's own host work
(packing inputs for three models, building the sampler's tensors, validation, Python loops)
decides the speed. Here it is measured alone: on a family so small that its forwards cost
almost nothing (hidden 32, 1 layer, vocabulary 32000), each configuration decodes a batch of
B requests for a number of steps, and every step's wall time is split by exclusive timers:

  forward       ModelRunner.run_model (the Hugging Face forward: Python and compute)
  op            eft_fast.ops.run_backend: the fused sampling op itself
  sampler_host  the sampler around the op: per-row parameter tensors, validation, results
                to the host, speculative round bookkeeping inside the sampling calls
  step_prep     StaticStep.forward / ModelRunner.forward / ModelRunner.metadata (packing)
  scheduling    Scheduler.schedule
  other         the rest of Engine.step: appending tokens, stop checks, deltas, the loop

host = wall - forward - op, per step (per round for speculation). Configurations: one model
alone, EFT (three models), and a speculative round (exact, k = 4).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..engine.engine import EFTEngine
from ..engine.sampling_params import SamplingParams
from .profile import Profiler, instrument_engine, profiled

BUCKETS = ("forward", "op", "sampler_host", "step_prep", "scheduling", "other")
BATCHES = (1, 16, 64, 256)
QUICK_BATCHES = (1, 16)
MODES = ("single", "eft", "spec_k4")
MODE_LABELS = {"single": "one model", "eft": "EFT (3 models)", "spec_k4": "EFT, speculative round k=4"}
# (mode, batch) -> the target for the host work per step, in ms (this machine).
TARGETS_MS = {("eft", 1): 0.3, ("eft", 64): 1.0}
PROMPT_LEN = 8


@dataclass
class HostRow:
    mode: str
    batch: int
    steps: int
    wall_ms: float          # per step
    ms: dict                # bucket -> ms per step
    host_ms: float          # wall - forward - op, per step
    tokens_per_step: float

    @property
    def label(self) -> str:
        return MODE_LABELS[self.mode]


def tiny_family(vocab: int = 32000, device="cpu", seed: int = 0) -> tuple:
    """(knowledge, tuned, reference): random-init Llamas with hidden 32 and one layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    models = []
    for i in range(3):
        torch.manual_seed(seed + i)
        models.append(LlamaForCausalLM(config).to(device).eval())
    return tuple(models)


def measure(models: tuple, mode: str, batch: int, steps: int, device) -> HostRow:
    """Decode ``batch`` requests for ``steps`` steps (after their prefill and a warm-up) and
    split the wall time (see the module docstring)."""
    knowledge, tuned, reference = models
    k = 4 if mode == "spec_k4" else 0
    roles = dict(tuned=tuned) if mode == "single" else dict(knowledge=knowledge, tuned=tuned, reference=reference)
    warm = 3
    max_tokens = (warm + steps + 2) * (k + 1)
    engine = EFTEngine(**roles, max_num_seqs=batch, speculative_k=k, max_model_len=PROMPT_LEN + max_tokens + k + 2,
                       block_size=16)
    vocab = tuned.config.vocab_size
    for i in range(batch):
        engine.add_request([(7 * i + j) % vocab for j in range(PROMPT_LEN)],
                           SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=True))
    for _ in range(10 * batch + 10):                    # prefill (chunked or not), bounded
        if all(r.output_ids for r in engine._requests.values()):
            break
        engine.step()
    for _ in range(warm):
        engine.step()
    profiler = Profiler(BUCKETS)
    instrument_engine(profiler, engine, sampling="sampler_host", op="op")
    tokens_before = sum(len(r.output_ids) for r in engine._requests.values())
    with profiled(profiler):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(device)
        wall = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in engine._requests.values()) - tokens_before
    if any(r.finished for r in engine._requests.values()):
        raise RuntimeError("a request finished inside the measured steps")
    timed = sum(profiler.seconds[b] for b in BUCKETS if b != "other")
    seconds = dict(profiler.seconds, other=max(wall - timed, 0.0))
    ms = {b: 1e3 * v / steps for b, v in seconds.items()}
    return HostRow(mode, batch, steps, 1e3 * wall / steps, ms, ms["other"] + ms["sampler_host"] + ms["step_prep"] +
                   ms["scheduling"], tokens / steps)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_host_overhead(device="cpu", quick: bool = False, steps: int | None = None, progress=None) -> list[HostRow]:
    models = tiny_family(device=device)
    rows = []
    for mode in MODES:
        for batch in (QUICK_BATCHES if quick else BATCHES):
            row = measure(models, mode, batch, steps or (5 if quick else 20), device)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def format_table(rows: list[HostRow]) -> str:
    from .report import _render

    table = [["configuration", "batch", "wall ms/step", "forward", "op", "host", "sampler host", "step prep",
              "scheduling", "other", "target"]]
    for r in rows:
        target = TARGETS_MS.get((r.mode, r.batch))
        verdict = "-" if target is None else (f"<= {target} ms: " + ("met" if r.host_ms <= target else
                                                                   f"missed ({r.host_ms / target:.1f}x)"))
        table.append([r.label, str(r.batch), f"{r.wall_ms:.2f}", f"{r.ms['forward']:.2f}", f"{r.ms['op']:.2f}",
                      f"{r.host_ms:.2f}", f"{r.ms['sampler_host']:.2f}", f"{r.ms['step_prep']:.2f}",
                      f"{r.ms['scheduling']:.2f}", f"{r.ms['other']:.2f}", verdict])
    return _render(table)


def payload(rows: list[HostRow], *, command: str, device: str, threads: int) -> dict:
    return {"command": command, "device": device, "threads": threads, "torch": torch.__version__,
            "models": "3 x Llama(hidden 32, 1 layer, vocabulary 32000), float32",
            "rows": [dict(asdict(r), label=r.label) for r in rows],
            "targets_ms": {f"{m}@{b}": t for (m, b), t in TARGETS_MS.items()}}
