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
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["request_id"])
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


# ---------------------------------------------------------------- --output


def _assert_usage_error(rc: int, err: str, *needles: str) -> None:
    """Exit code 2 and one line 'eft-fast generate: error: ...' naming every needle, last on stderr
    (after transformers' loading bars, if models were loaded), no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("eft-fast generate: error: "), err
    assert err.endswith(errors[0] + "\n"), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def test_unwritable_output_fails_before_loading_models(model_dirs, tmp_path, capsys, monkeypatch):
    import eft_fast.cli_generate as cli_generate

    def no_models(args):
        raise AssertionError("the models were loaded before --output was checked")

    monkeypatch.setattr(cli_generate, "build_engine", no_models)
    for path in (tmp_path / "no-such-dir" / "out.jsonl", tmp_path):   # a missing folder; a directory
        rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompt", "hi", "-o", str(path)])
        _assert_usage_error(rc, capsys.readouterr().err, "--output", str(path))


def test_output_kept_when_models_fail_and_removed_when_new(model_dirs, tmp_path, capsys):
    old = tmp_path / "old.jsonl"
    old.write_text('{"earlier": "results"}\n')
    new = tmp_path / "new.jsonl"
    for path in (old, new):
        rc = main(["generate", "--knowledge", str(tmp_path / "missing"), "--tuned", model_dirs["tuned"],
                   "--reference", model_dirs["reference"], "--prompt", "hi", "-o", str(path)])
        _assert_usage_error(rc, capsys.readouterr().err, "knowledge")
    assert old.read_text() == '{"earlier": "results"}\n'      # nothing generated: the old file is kept
    assert not new.exists()                                     # and an empty new one is not left behind


def _count_lines_at_each_step(monkeypatch, out, crash_after_lines=None) -> list[int]:
    """Record how many lines `out` holds before every engine step (optionally crash the run once
    it holds crash_after_lines)."""
    from eft_fast.engine.engine import EFTEngine

    seen = []
    step = EFTEngine.step

    def counting_step(self):
        lines = len(out.read_text().splitlines())
        seen.append(lines)
        if crash_after_lines is not None and lines >= crash_after_lines:
            raise RuntimeError("simulated crash")
        return step(self)

    monkeypatch.setattr(EFTEngine, "step", counting_step)
    return seen


def test_lines_are_written_as_requests_finish(model_dirs, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("hello world\n" + json.dumps({"prompt": [5, 6, 7]}) + "\nthe quick brown fox\n")
    out = tmp_path / "out.jsonl"
    out.write_text("stale line from an earlier run\n")
    seen = _count_lines_at_each_step(monkeypatch, out)
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompts-file", str(prompts), "--max-tokens", "3",
               "--ignore-eos", "--seed", "1", "--max-num-seqs", "1", "-o", str(out), "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["request_id"] for r in records) == [0, 1, 2]
    by_id = sorted(records, key=lambda r: r["request_id"])
    assert [r["prompt"] for r in by_id] == ["hello world", [5, 6, 7], "the quick brown fox"]
    for r in records:
        assert set(r) == {"request_id", "prompt", "text", "token_ids", "logprobs", "finish_reason", "error",
                          "metrics"}
        assert r["finish_reason"] == "length" and len(r["token_ids"]) == 3 and r["error"] is None
    # one request at a time: the engine went on stepping with one and then two lines already written
    assert seen[0] == 0 and 1 in seen and 2 in seen


def test_finished_lines_survive_a_later_crash(model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    _count_lines_at_each_step(monkeypatch, out, crash_after_lines=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["generate", "--tuned", model_dirs["tuned"], "--prompt", "hello", "--prompt", "world",
              "--max-tokens", "2", "--ignore-eos", "--max-num-seqs", "1", "-o", str(out), "--no-progress"])
    [line] = out.read_text().splitlines()
    record = json.loads(line)
    assert record["request_id"] == 0 and record["finish_reason"] == "length"


# ---------------------------------------------------------------- usage errors


BAD_PROMPT_FILES = {
    "null prompt": ('{"prompt": "ok"}\n{"prompt": null}\n', ["line 2", "prompt", "null"]),
    "number prompt": ('{"prompt": 123}\n', ["line 1", "123"]),
    "dict prompt": ('hi\n\n{"prompt": {"text": "hi"}}\n', ["line 3"]),
    "list with a string": ('{"prompt": [1, "2"]}\n', ["line 1"]),
    "list with a bool": ('{"prompt": [1, true]}\n', ["line 1"]),
    "empty list": ('{"prompt": []}\n', ["line 1"]),
    "no prompt field": ('{"text": "hi"}\n', ["line 1", "'prompt'"]),
    "broken JSON": ('hello\n{"prompt": "hi",}\n', ["line 2", "invalid JSON", "column"]),
    "ids outside the vocabulary": ('{"prompt": "fine"}\n{"prompt": [5, 99999]}\n', ["line 2", "99999"]),
    "blank file": ("\n\n", ["holds no prompts"]),
}


@pytest.mark.parametrize("case", list(BAD_PROMPT_FILES))
def test_bad_prompts_file_is_a_usage_error(case, model_dirs, tmp_path, capsys):
    text, needles = BAD_PROMPT_FILES[case]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(text)
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompts-file", str(prompts), "--max-tokens", "2",
               "-o", str(out), "--no-progress"])
    _assert_usage_error(rc, capsys.readouterr().err, "--prompts-file", *needles)
    assert not out.exists()     # a bad prompt fails before anything is generated


def test_prompts_file_directory_or_missing(model_dirs, tmp_path, capsys):
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompts-file", str(tmp_path)])
    _assert_usage_error(rc, capsys.readouterr().err, "--prompts-file", "is a directory")
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompts-file", str(tmp_path / "nope.txt")])
    _assert_usage_error(rc, capsys.readouterr().err, "--prompts-file", "does not exist")


BAD_OPTIONS = {
    "too many weights": (["--reward-weights", "1,2"], ["--reward-weights", "2 weight"]),
    "empty weights": (["--reward-weights", ""], ["--reward-weights", "empty"]),
    "non-numeric weights": (["--reward-weights", "0.5,abc"], ["--reward-weights", "'abc'"]),
    "seed past the limit": (["--seed", str(2**63 - 1)], ["--seed", str(2**63 - 2)]),
    "negative seed": (["--seed", "-1"], ["--seed"]),
    "negative temperature": (["--temperature", "-1"], ["--temperature"]),
    "top-p above one": (["--top-p", "1.5"], ["--top-p"]),
    "zero max tokens": (["--max-tokens", "0"], ["--max-tokens"]),
    "negative speculative k": (["--speculative-k", "-1"], ["--speculative-k"]),
    "bad device": (["--device", "tpu:x"], ["--device"]),
    "bad dtype": (["--dtype", "int8"], ["--dtype"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_a_usage_error(case, model_dirs, tmp_path, capsys):
    extra, needles = BAD_OPTIONS[case]
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompt", "a", "--prompt", "b", "--max-tokens", "2",
               "--no-progress", *extra])
    _assert_usage_error(rc, capsys.readouterr().err, *needles)


def test_largest_seed_is_accepted(model_dirs, capsys):
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompt", "a", "--prompt", "b", "--max-tokens", "2",
               "--ignore-eos", "--seed", str(2**63 - 2), "--no-progress"])
    assert rc == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_chat_format_without_template_is_a_usage_error(model_dirs, capsys):
    rc = main(["generate", "--knowledge", model_dirs["knowledge"], "--prompt", "hi", "--prompt-format", "chat"])
    _assert_usage_error(rc, capsys.readouterr().err, "--prompt 1", "chat")


def test_cuda_device_without_gpu_is_a_usage_error(model_dirs, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompt", "hi", "--device", "cuda"])
    _assert_usage_error(rc, capsys.readouterr().err, "--device", "GPU")


def test_request_errors_stay_in_the_records(model_dirs, tmp_path, capsys):
    """A prompt longer than the model's context fails as a request (exit 1), not as a usage error."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("hello\n" + json.dumps({"prompt": [5] * 5000}) + "\n")
    rc = main(["generate", "--tuned", model_dirs["tuned"], "--prompts-file", str(prompts), "--max-tokens", "2",
               "--ignore-eos", "--no-progress"])
    assert rc == 1
    records = {r["request_id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert records[0]["finish_reason"] == "length" and records[0]["error"] is None
    assert records[1]["finish_reason"] == "error" and "context" in records[1]["error"]


def test_generate_with_a_tensor_parallel_knowledge_model(model_dirs, capsys):
    args = ["generate", "--knowledge", model_dirs["knowledge"], "--tuned", model_dirs["tuned"],
            "--reference", model_dirs["reference"], "--prompt", "hello world", "--max-tokens", "5",
            "--seed", "3", "--ignore-eos"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert main(args + ["--tensor-parallel-size", "2"]) == 0
    two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert two == one and len(one) == 5
    assert main(args + ["--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err
