"""`eft-fast bench`: one smoke run of the engine benchmark (--quick) checking its JSON, and
the synthetic family's construction."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from eft_fast.bench.engine import COLUMN_ORDER
from eft_fast.bench.profile import Profiler
from eft_fast.bench.synthetic import QUICK_SPEC, FamilySpec, _config, build_family, random_contexts
from eft_fast.bench.workloads import SPEC_KS
from eft_fast.cli import main


def test_bench_quick_writes_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "naive EFT loop" in printed and "targets:" in printed
    data = json.loads((tmp_path / "engine_bench.json").read_text())

    assert data["command"] == f"eft-fast bench --quick --out {tmp_path} --no-progress"
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["threads"] == 1
    assert data["models"]["kind"] == "synthetic"
    assert set(data["models"]["parameters"]) == {"knowledge", "tuned", "reference"}
    assert data["sampling"]["temperature"] == 1.0
    assert [w["key"] for w in data["workloads"]] == ["batch1", "concurrent16", "mixed8"]
    assert [w["concurrency"] for w in data["workloads"]] == [1, 16, 8]
    batch1, concurrent, mixed = data["workloads"]
    assert list(batch1["columns"]) == [k for k in COLUMN_ORDER if k != "naive_batched"]
    assert list(concurrent["columns"]) == COLUMN_ORDER
    for w in (batch1, concurrent):
        assert w["best_k"] in SPEC_KS
        assert w["identical"] is True
        for key, c in w["columns"].items():
            assert c["tokens"] == w["num_requests"] * w["max_tokens"], key
            assert c["seconds"] > 0 and c["tokens_per_s"] > 0 and c["cpu_seconds"] > 0
            fractions = c["breakdown"]["fraction"]
            assert set(fractions) == {"forward", "step_prep", "sampling", "scheduling", "other"}
            assert math.isclose(sum(fractions.values()), 1.0, rel_tol=1e-6)
            assert w["speedup_vs_naive"][key] > 0 and w["speedup_vs_eft"][key] > 0
        for k in SPEC_KS:
            c = w["columns"][f"spec_k{k}"]
            assert c["speculative_k"] == k and c["accept"] == "exact" and c["identical"] is True
            assert 0.0 <= c["acceptance_rate"] <= 1.0 and c["rounds"] > 0
        auto = w["columns"]["spec_auto"]
        assert auto["speculative_k"] == "auto" and auto["accept"] == "exact" and auto["identical"] is True
        rejection = w["columns"]["rejection"]
        assert rejection["accept"] == "rejection" and rejection["speculative_k"] == w["best_k"]
        assert rejection["identical"] is None
        assert w["columns"]["eft"]["acceptance_rate"] is None
        assert w["speedup_vs_naive"]["naive"] == pytest.approx(1.0)
    assert concurrent["speedup_vs_naive_batched"]["naive_batched"] == pytest.approx(1.0)
    # Mixed lengths: eft_fast EFT and the naive batched loop on long-tailed max_tokens in [4, 32].
    assert list(mixed["columns"]) == ["naive_batched", "eft", "spec_auto"] and mixed["best_k"] is None
    assert mixed["columns"]["spec_auto"]["identical"] is True
    lengths = mixed["max_tokens_each"]
    assert len(lengths) == 8 and all(4 <= n <= 32 for n in lengths) and mixed["max_tokens"] == max(lengths)
    for c in mixed["columns"].values():
        assert c["tokens"] == sum(lengths) and c["tokens_per_s"] > 0
    assert data["identical"] is True
    assert [t["workload"] for t in data["targets"]] == ["batch1", "concurrent16", "batch1", "batch1", "concurrent16",
                                                        "concurrent16", "mixed8", "batch1", "concurrent16", "mixed8",
                                                        "batch1"]
    for target in data["targets"]:
        assert target["measured"] > 0 and isinstance(target["met"], bool)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["plot"] is None
    else:
        assert data["plot"] == "engine_bench.png"
        assert (tmp_path / "engine_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [["--op", "--knowledge", "x"], ["--tuned", "x"], ["--knowledge", "a", "--tuned", "b"],
                                  ["--threads", "0"]])
def test_bench_rejects_bad_model_options(argv, tmp_path, capsys):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    assert "eft-fast bench:" in capsys.readouterr().err


def test_default_family_sizes():
    """The knowledge model has 8-10x the parameters of the small ones (counted without weights)."""
    spec = FamilySpec()
    counts = {}
    for name, (hidden, layers, inter) in {"small": (spec.small_hidden, spec.small_layers, spec.small_intermediate),
                                          "knowledge": (spec.knowledge_hidden, spec.knowledge_layers,
                                                        spec.knowledge_intermediate)}.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in LlamaForCausalLM(_config(spec, hidden, layers, inter)).parameters())
    assert 8 <= counts["knowledge"] / counts["small"] <= 10


@torch.no_grad()
def test_knowledge_model_holds_the_reference():
    """With no residual the knowledge model computes the reference's logits; with one it differs
    a little; the tuned model is a perturbed reference; the output scale makes outputs peaked."""
    contexts = random_contexts(QUICK_SPEC.vocab_size, 2, 24, seed=3)
    exact = build_family(dataclasses.replace(QUICK_SPEC, knowledge_residual=0.0), dtype=torch.float64)
    ref = exact.reference(contexts).logits
    # run in float64; the weights (the rescaled norm gains among them) were rounded to float32
    torch.testing.assert_close(exact.knowledge(contexts).logits, ref, rtol=0, atol=1e-5)

    family = build_family(QUICK_SPEC, dtype=torch.float64)
    diff = (family.knowledge(contexts).logits - family.reference(contexts).logits).abs().max()
    assert 0 < diff < ref.abs().max()
    assert not torch.equal(family.tuned.lm_head.weight, family.reference.lm_head.weight)
    top1 = family.reference(contexts).logits.softmax(-1).amax(-1).mean()
    assert 0.3 < top1 < 0.9
    assert family.describe()["knowledge_over_small"] > 5


def test_profiler_buckets_are_exclusive_and_restored():
    class Thing:
        def outer(self):
            return self.inner() + 1

        def inner(self):
            return 1

    thing = Thing()
    profiler = Profiler()
    profiler.wrap(thing, "outer", "scheduling")
    profiler.wrap(thing, "inner", "forward")
    assert thing.outer() == 2
    assert profiler.calls["scheduling"] == 1 and profiler.calls["forward"] == 1
    profiler.restore()
    assert "outer" not in vars(thing) and "inner" not in vars(thing)
    assert thing.outer() == 2


def test_bench_quick_on_model_paths(tmp_path, capsys):
    """--knowledge/--tuned/--reference: checkpoints from local directories, text prompts
    tokenized by the tuned model's tokenizer."""
    from tiny_hf import byte_level_bpe, tiny_llama

    tok = byte_level_bpe()
    paths = {}
    for seed, role in enumerate(("knowledge", "tuned", "reference")):
        paths[role] = tmp_path / role
        tiny_llama(len(tok), seed=seed).save_pretrained(paths[role])
        tok.save_pretrained(paths[role])
    out = tmp_path / "out"
    argv = ["bench", "--quick", "--knowledge", str(paths["knowledge"]), "--tuned", str(paths["tuned"]),
            "--reference", str(paths["reference"]), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    data = json.loads((out / "engine_bench.json").read_text())
    assert data["models"]["kind"] == "pretrained"
    assert data["models"]["models"]["tuned"] == str(paths["tuned"])
    assert data["identical"] is True
    assert [set(w["columns"]) <= set(COLUMN_ORDER) for w in data["workloads"]] == [True] * 3
    assert list(data["workloads"][1]["columns"]) == COLUMN_ORDER


def test_bench_tensor_parallel(tmp_path, capsys):
    """The quick family's knowledge model has 6 heads and 3 KV heads: 3 ranks."""
    assert main(["bench", "--quick", "--tensor-parallel-size", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "tensor_parallel_bench.json").read_text())
    assert [r["tensor_parallel_size"] for r in data["rows"]] == [1, 3]
    assert data["identical"] and all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert data["rows"][1]["broadcast_ms"] > 0 and data["rows"][0]["broadcast_ms"] is None
    assert "tokens identical: True" in capsys.readouterr().out


def test_bench_host_overhead_quick(tmp_path, capsys):
    """--host-overhead: every configuration and batch, wall time split into buckets that add up."""
    assert main(["bench", "--host-overhead", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "EFT, speculative round k=4" in capsys.readouterr().out
    data = json.loads((tmp_path / "host_overhead.json").read_text())
    rows = data["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for m in ("single", "eft", "spec_k4") for b in (1, 16)]
    for r in rows:
        assert math.isclose(sum(r["ms"].values()), r["wall_ms"], rel_tol=1e-6)
        assert r["host_ms"] == pytest.approx(r["wall_ms"] - r["ms"]["forward"] - r["ms"]["op"])
        assert r["ms"]["forward"] > 0 and r["ms"]["op"] > 0 and r["host_ms"] > 0
        assert r["tokens_per_step"] >= r["batch"]           # one token per request per step, more with drafts
    assert main(["bench", "--host-overhead", "--op", "--out", str(tmp_path)]) == 2
