"""The engine on each device: paged attention (the Triton kernel on CUDA, the torch path on the
CPU) equal to HF's dense forward, CUDA-graph steps token-identical to eager ones, speculative
identical to plain, and a model on a device that is not the current one. GPU legs carry the `gpu`
marker and skip with "needs a CUDA device" elsewhere; the cpu legs run the same bodies."""
from __future__ import annotations

import copy

import pytest
import torch

import eft_fast
from eft_fast.engine.block_manager import BlockTable
from eft_fast.engine.model_runner import ModelRunner, SequenceStep
from engine_helpers import VOCAB, random_requests, tiny_family
from tiny_models import dense_logits, tiny_model, twin

_CUDA = torch.cuda.is_available()
_NEEDS_CUDA = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, _NEEDS_CUDA])]


def _family_on(device: str):
    knowledge, tuned, reference = tiny_family(torch.float32)
    return knowledge.to(device), [t.to(device) for t in tuned], reference.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_paged_attention_matches_dense_forward(device, arch, rng):
    model = tiny_model(arch, VOCAB, torch.float32).to(device)
    runner = ModelRunner(twin(model, "sdpa"), block_size=4, num_blocks=64)
    assert runner.attention_backend == ("triton" if device == "cuda" else "torch")
    prompts = [torch.randint(0, VOCAB, (n,), generator=rng).tolist() for n in (5, 1, 9, 17)]
    tables = [BlockTable() for _ in prompts]
    for t, p in zip(tables, prompts):
        assert runner.blocks.ensure(t, len(p) + 8)
    seqs = [list(p) for p in prompts]
    news = prompts
    for step in range(6):
        logits = runner.forward([SequenceStep(t, n) for t, n in zip(tables, news)], all_logits=True)
        offset = 0
        for seq, new in zip(seqs, news):
            want = dense_logits(model, seq)[-len(new):]
            torch.testing.assert_close(logits[offset:offset + len(new)].float().cpu(), want.float().cpu(),
                                       atol=2e-4, rtol=0)
            offset += len(new)
        news = [torch.randint(0, VOCAB, (3 if step == 2 and i % 2 else 1,), generator=rng).tolist()
                for i in range(len(seqs))]
        for seq, new in zip(seqs, news):
            seq.extend(new)


@pytest.mark.gpu
@_NEEDS_CUDA
def test_cuda_graph_steps_equal_eager(rng):
    family = _family_on("cuda")
    prompts, params = random_requests(rng, 6, max_tokens=8)
    outs = {}
    for graphs in (True, False):
        for k in (0, 3):
            knowledge, tuned, reference = copy.deepcopy(family)
            engine = eft_fast.EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, block_size=4,
                                        speculative_k=k, use_cuda_graph=graphs)
            outs[graphs, k] = [o.token_ids for o in engine.generate(prompts, params)]
            if graphs:   # every static step (decode of each model, verify) captured into one pool
                steps = engine.decoder.decode_steps + list(getattr(engine.decoder.speculative, "_verify_steps", {}).values())
                assert len({g.pool() for step in steps for g in step.graphs.values()}) == 1
                assert len(steps) >= 3
    assert outs[True, 0] == outs[False, 0] == outs[True, 3] == outs[False, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_equals_plain(device, rng):
    knowledge, tuned, reference = _family_on(device)
    prompts, params = random_requests(rng, 5, max_tokens=9)
    plain = eft_fast.EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, block_size=4)
    spec = eft_fast.EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, block_size=4,
                              speculative_k=3)
    assert [o.token_ids for o in spec.generate(prompts, params)] == \
        [o.token_ids for o in plain.generate(prompts, params)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a CUDA device (two of them)")
def test_a_model_on_cuda_1_while_cuda_0_is_current(rng):
    """CUDA graphs captured for a model on cuda:1 while cuda:0 is current replay the right
    forwards: the tokens equal those of eager steps on the same device."""
    torch.cuda.set_device(0)
    prompts, params = random_requests(rng, 4, max_tokens=8)
    outs = []
    for graphs in (False, True):
        knowledge, tuned, reference = _family_on("cuda:1")
        engine = eft_fast.EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, block_size=4,
                                    use_cuda_graph=graphs)
        outs.append([o.token_ids for o in engine.generate(prompts, params)])
        assert torch.cuda.current_device() == 0
    assert outs[0] == outs[1]
