"""Where the cpu op's time goes: CPU time per vocabulary element, single thread, B=16,
V=128256, fp32 logits N(0, 9), for configurations that switch the passes on one by one
(the least of `iters` calls: the machine is shared).

    python bench/op_phases.py
"""
import time

import torch

from eft_fast._validation import normalize_inputs
from eft_fast.ops import run_backend

CONFIGS = {
    "draft (tuned only), greedy: one pass": dict(knowledge=False, reference=False, temperature=0.0),
    "EFT, greedy: one pass over three rows": dict(temperature=0.0),
    "EFT, greedy, weight_top_p=0.9: + truncation (3 sums, candidates), pass 2 over c":
        dict(temperature=0.0, weight_top_p=0.9),
    "EFT, T=1: + Gumbel noise, in the one pass": dict(temperature=1.0),
    "EFT, T=1, weight_top_p=0.9": dict(temperature=1.0, weight_top_p=0.9),
    "EFT, T=1, top_k=50, top_p=0.9: + z in memory, radix selects": dict(temperature=1.0, top_k=50, top_p=0.9),
}


def main(batch: int = 16, vocab: int = 128256, iters: int = 10) -> None:
    torch.set_num_threads(1)
    logits = [torch.randn(batch, vocab) * 3 for _ in range(3)]
    seeds, positions = torch.arange(batch), torch.arange(batch)
    print(f"ns of CPU time per element (B={batch}, V={vocab}, 1 thread)")
    for name, cfg in CONFIGS.items():
        cfg = dict(cfg)
        knowledge = logits[0] if cfg.pop("knowledge", True) else None
        reference = logits[2] if cfg.pop("reference", True) else None
        inputs = normalize_inputs(knowledge, logits[1], reference, seeds, positions, **cfg)
        run_backend(inputs, "cpu", False)
        best = float("inf")
        for _ in range(iters):
            start = time.process_time()
            run_backend(inputs, "cpu", False)
            best = min(best, time.process_time() - start)
        ns = best / (batch * vocab) * 1e9
        print(f"  {ns:6.2f}  {name}")


if __name__ == "__main__":
    main()
