"""The paged runner on a real checkpoint: SmolLM2-135M-Instruct (Llama architecture, GQA)."""
from __future__ import annotations

import torch

from eft_fast.engine.block_manager import BlockTable
from eft_fast.engine.model_runner import ModelRunner, SequenceStep
from eft_fast.engine.static_step import StaticStep


def test_smollm2_paged_matches_hf_forward(smollm2):
    model, tokenizer = smollm2
    messages = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Write a haiku about autumn leaves."}]]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in messages]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    with torch.no_grad():
        dense = [model(torch.tensor([p]), use_cache=False).logits[0] for p in prompts]
        greedy = [d[-1].argmax().item() for d in dense]
        dense_next = [model(torch.tensor([p + [g]]), use_cache=False).logits[0, -1] for p, g in zip(prompts, greedy)]

    runner = ModelRunner(model, block_size=16, num_blocks=16, role="tuned")
    tables = [BlockTable() for _ in prompts]
    for t, p in zip(tables, prompts):
        assert runner.blocks.ensure(t, len(p) + 1)
    logits = runner.forward([SequenceStep(t, p) for t, p in zip(tables, prompts)])
    for got, want in zip(logits, dense):
        torch.testing.assert_close(got, want[-1], atol=2e-4, rtol=1e-4)
    decode = StaticStep(runner, 1, max_batch=2).forward([SequenceStep(t, [g]) for t, g in zip(tables, greedy)])
    for got, want in zip(decode, dense_next):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert [int(x) for x in logits.argmax(-1)] == greedy
