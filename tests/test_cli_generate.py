"""`eft-fast generate` on models given as local paths."""
from __future__ import annotations

import json

import pytest

from eft_fast.cli import main
from tiny_hf import CHAT_TEMPLATE, byte_level_bpe, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = byte_level_bpe()
    dirs = {}
    for seed, name in enumerate(("knowledge", "tuned", "reference")):
        path = root / name
        tiny_llama(len(tok), seed=seed).save_pretrained(path)
        if name == "tuned":
            tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(path)
        tok.chat_template = None
        dirs[name] = str(path)
    return dirs


def test_generate_writes_jsonl(model_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\n" + json.dumps({"prompt": "the quick brown fox"}) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--knowledge", model_dirs["knowledge"], "--tuned", model_dirs["tuned"],
               "--reference", model_dirs["reference"], "--prompts-file", str(prompts), "--max-tokens", "7",
               "--seed", "3", "--ignore-eos", "--speculative-k", "2", "--output", str(out), "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["hello world", "the quick brown fox"]
    for r in records:
        assert len(r["token_ids"]) == 7 and len(r["logprobs"]) == 7 and r["finish_reason"] == "length"
        assert r["error"] is None and r["metrics"]["generated_tokens"] == 7
        # the tuned model saw its chat template, the base models the plain prompt
        assert r["metrics"]["prompt_tokens"]["tuned"] > r["metrics"]["prompt_tokens"]["knowledge"]
    # the same seeds without speculation give the same tokens (exact acceptance)
    rc = main(["generate", "--knowledge", model_dirs["knowledge"], "--tuned", model_dirs["tuned"],
               "--reference", model_dirs["reference"], "--prompt", "hello world", "--max-tokens", "7",
               "--seed", "3", "--ignore-eos"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["token_ids"] == records[0]["token_ids"]


def test_generate_errors_are_reported(model_dirs, tmp_path, capsys):
    rc = main(["generate", "--knowledge", str(tmp_path / "missing"), "--tuned", model_dirs["tuned"],
               "--reference", model_dirs["reference"], "--prompt", "hi"])
    assert rc == 2
    assert "knowledge" in capsys.readouterr().err
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompt", "hi", "--temperature", "-1"])
    assert rc == 2 and "temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--tuned", model_dirs["tuned"]])          # no prompt
