"""A knowledge model quantized through transformers' quantization configs (torchao int8
weight-only, which runs on CPU) runs through the engine: paged logits equal the quantized
model's own forward, generation runs, and its linear weights take about a quarter of the bytes."""
from __future__ import annotations

import pytest
import torch

from eft_fast import EFTEngine, SamplingParams
from eft_fast.engine.block_manager import BlockTable
from eft_fast.engine.model_runner import SequenceStep
from tiny_hf import byte_level_bpe
from tiny_models import dense_logits, tiny_model

torchao = pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_weight_bytes(model) -> int:
    """Bytes of the decoder layers' linear weights (a quantized weight: its inner tensors)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            inner = [getattr(w, name) for name in w.__tensor_flatten__()[0]] if hasattr(w, "__tensor_flatten__") \
                else [w]
            total += sum(t.numel() * t.element_size() for t in inner)
    return total


def test_int8_weight_only_knowledge_model(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    tok = byte_level_bpe()
    v = len(tok)
    full = tiny_model("llama", v, torch.float32, seed=11, num_hidden_layers=3, hidden_size=96, intermediate_size=128)
    full.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                     quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert _linear_weight_bytes(quantized) < 0.3 * _linear_weight_bytes(full)
    ids = list(range(3, 14))
    expected = dense_logits(quantized, ids)
    assert (expected - dense_logits(full, ids)).abs().max() < 0.1        # int8 weights, close to fp32
    engine = EFTEngine(knowledge=quantized, tuned=tiny_model("llama", v, torch.float32, seed=20),
                       reference=tiny_model("llama", v, torch.float32, seed=30), tokenizer=tok, block_size=4,
                       backend="torch")
    runner = engine.runners[engine.roles.knowledge]
    table = BlockTable()
    assert runner.blocks.ensure(table, len(ids))
    assert torch.allclose(runner.forward([SequenceStep(table, ids)], all_logits=True), expected, atol=1e-5)
    runner.blocks.release(table)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=6, seed=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
