"""The engine on a real checkpoint: SmolLM2-135M-Instruct as the tuned chat model."""
from __future__ import annotations

import copy

import pytest
import torch

import eft_fast
from eft_fast import EFTEngine, SamplingParams
from eft_fast.naive_loop import naive_generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(model, scale, seed):
    """A copy of ``model`` with every weight matrix nudged: a stand-in base model of the same family."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return other


def test_smollm2_tuned_with_chat_template(smollm2):
    tuned, tok = smollm2
    knowledge, reference = _perturbed(tuned, 0.02, 1), _perturbed(tuned, 0.05, 2)
    question = "What is the capital of France?"
    params = SamplingParams(max_tokens=8, temperature=0.0)
    engine = EFTEngine(knowledge=knowledge, tuned=tuned, reference=reference, tokenizer=tok, backend="torch")
    out = engine.generate([question], params)[0]
    chat_ids = list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_dict=False))
    plain_ids = tok(question).input_ids
    assert out.metrics.prompt_tokens == {"knowledge": len(plain_ids), "tuned": len(chat_ids),
                                         "reference": len(plain_ids)}
    assert len(out.token_ids) == 8 and out.text == tok.decode(out.token_ids, skip_special_tokens=True)

    def combine(logits, step):   # greedy EFT with the fp64 reference op
        tokens, _ = eft_fast.eft_sample(logits[0][None], logits[1][None], logits[2][None], 0, 0,
                                        temperature=0.0, backend="torch")
        return int(tokens[0])

    want = naive_generate([knowledge, tuned, reference], [plain_ids, chat_ids, plain_ids], combine, 8,
                          eos_token_ids=sorted(engine.models.eos_token_ids))
    assert out.token_ids == want
    spec = EFTEngine(knowledge=knowledge, tuned=tuned, reference=reference, tokenizer=tok, backend="torch",
                     speculative_k=3).generate([question], params)[0]
    assert spec.token_ids == out.token_ids and spec.metrics.rounds > 0
