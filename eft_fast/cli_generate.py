"""`eft-fast generate`: EFT generation from the command line, JSONL out.

Every mistake a user can make (a bad option, prompt file, prompt, model or output path) ends as
one line ``eft-fast generate: error: ...`` on stderr and exit code 2, before any generation.
Errors of single requests during generation stay in their output records (finish_reason
"error") and make the exit code 1.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .cli_engine import (UsageError, add_engine_arguments, add_model_arguments, build_engine, check_device, name_flag,
                         one_line)

SEED_LIMIT = 2**63


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate with an EFT engine; one JSON line per prompt",
                       description="Generate from knowledge + (tuned - reference). Models are HF ids, local "
                                   "directories or .gguf files. Give one model alone to sample it by itself.")
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file",
                     help="a file with one prompt per line, or JSONL objects with a 'prompt' field: a string, "
                          "or a list of token ids")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--weight-top-p", type=float, default=1.0)
    p.add_argument("--reward-weights", help="comma-separated weights, one per --tuned (e.g. 0.3,0.7)")
    p.add_argument("--seed", type=int,
                   help="seed of the first prompt; prompt i uses seed + i, so seed + (number of prompts) - 1 "
                        "must be below 2**63 (default: random)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    add_engine_arguments(p)
    p.add_argument("--output", "-o",
                   help="JSONL output file (default: stdout). Checked before the models load; its old content "
                        "is replaced once generation starts. Each request's line is written (and flushed) as "
                        "soon as it finishes, so lines come in completion order: sort by 'request_id', which "
                        "numbers the prompts in their given order from 0, to restore the prompt order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One prompt (text or token ids) and where it came from, for error messages."""

    value: str | list[int]
    where: str


def _read_prompts(args) -> list[Prompt]:
    """The prompts of --prompt or --prompts-file, in order."""
    if args.prompt:
        return [Prompt(text, f"--prompt {i + 1}") for i, text in enumerate(args.prompt)]
    path = Path(args.prompts_file)
    prompts = [Prompt(value, f"--prompts-file line {n}") for n, value in _prompt_lines(path)]
    if not prompts:
        raise UsageError(f"--prompts-file {path} holds no prompts")
    return prompts


def _read_text(path: Path) -> str:
    """The text of --prompts-file; a missing path, a directory or an unreadable file is a UsageError."""
    if path.is_dir():
        raise UsageError(f"--prompts-file {path} is a directory, not a file")
    if not path.exists():
        raise UsageError(f"--prompts-file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--prompts-file {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts-file {path} is not UTF-8 text: {e}") from None


def _prompt_lines(path: Path):
    """Yield (line number, prompt) for every non-blank line: a JSON object's 'prompt', else the line."""
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            yield n, _json_prompt(line, n)
        else:
            yield n, line


def _json_prompt(line: str, n: int) -> str | list[int]:
    """The 'prompt' of a JSON line: a string, or a non-empty list of ints (token ids)."""
    where = f"--prompts-file line {n}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise UsageError(f"{where}: a JSON line needs a 'prompt' field")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    raise UsageError(f"{where}: 'prompt' must be a string or a non-empty list of token ids (ints), "
                     f"got {json.dumps(prompt, ensure_ascii=False)[:60]}")


# ---------------------------------------------------------------- options


def _reward_weights(text: str | None, num_tuned: int) -> list[float] | None:
    """--reward-weights as floats, one per tuned model (None when not given)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise UsageError("--reward-weights is empty; give one comma-separated number per --tuned (e.g. 0.3,0.7)")
    weights = []
    for part in parts:
        try:
            weights.append(float(part))
        except ValueError:
            raise UsageError(f"--reward-weights: {part!r} is not a number (give comma-separated numbers, "
                             f"e.g. 0.3,0.7)") from None
    if len(weights) != num_tuned:
        raise UsageError(f"--reward-weights has {len(weights)} weight(s) but there are {num_tuned} tuned "
                         f"model(s); give one per --tuned")
    return weights


def _seeds(seed: int | None, n: int) -> list[int]:
    """Seeds of n prompts: seed + i, each in [0, 2**63); a random base when seed is None."""
    import secrets

    if seed is None:
        return [secrets.randbits(62) + i for i in range(n)]
    if not 0 <= seed <= SEED_LIMIT - n:
        raise UsageError(f"--seed must be in [0, 2**63 - {n}] = [0, {SEED_LIMIT - n}] for {n} prompt(s) "
                         f"(prompt i uses seed + i, and seeds stay below 2**63), got {seed}")
    return [seed + i for i in range(n)]


def _params(args, n: int) -> list:
    """One SamplingParams per prompt."""
    from .engine.sampling_params import SamplingParams

    weights = _reward_weights(args.reward_weights, len(args.tuned) if args.tuned else 1)
    try:
        return [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, weight_top_p=args.weight_top_p, reward_weights=weights,
                               seed=seed, stop=args.stop, ignore_eos=args.ignore_eos)
                for seed in _seeds(args.seed, n)]
    except (ValueError, TypeError) as e:
        raise UsageError(name_flag(str(e))) from None


# ---------------------------------------------------------------- output


class JsonlOutput:
    """Where the JSON lines go: stdout, or the --output file.

    The file is opened for appending when the command starts, before any model loads, so an
    unwritable path fails at once and an existing file is kept if the run stops with an error
    before generating; :meth:`begin` empties it when generation starts. Each line is flushed
    as it is written, so the finished lines survive a later crash.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.created = False
        if path is None:
            self.file = sys.stdout
            return
        existed = os.path.lexists(path)
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--output {path} cannot be opened for writing: {e.strerror or e}") from None
        self.created = not existed

    def begin(self) -> None:
        """Empty a regular output file (pipes and devices are left as they are)."""
        if self.file is not sys.stdout and stat.S_ISREG(os.fstat(self.file.fileno()).st_mode):
            self.file.truncate(0)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self, *, keep: bool) -> None:
        """Close the file; remove it if this command created it and nothing was generated (keep=False)."""
        if self.file is sys.stdout:
            return
        self.file.close()
        if not keep and self.created:
            os.unlink(self.path)


def _record(o) -> dict:
    """The JSON record of one RequestOutput."""
    m = o.metrics
    return {"request_id": o.request_id, "prompt": o.prompt, "text": o.text, "token_ids": o.token_ids,
            "logprobs": o.logprobs, "finish_reason": o.finish_reason, "error": o.error,
            "metrics": {"prompt_tokens": m.prompt_tokens, "generated_tokens": m.generated_tokens,
                        "time_to_first_token_s": m.time_to_first_token_s, "total_time_s": m.total_time_s,
                        "tokens_per_s": m.tokens_per_s, "proposed_tokens": m.proposed_tokens,
                        "accepted_tokens": m.accepted_tokens, "acceptance_rate": m.acceptance_rate}}


# ---------------------------------------------------------------- engine


def _add_requests(engine, prompts: list[Prompt], params: list) -> list[int]:
    """Queue every prompt before any generation, so that a bad prompt fails up front."""
    ids = []
    for prompt, sp in zip(prompts, params):
        try:
            ids.append(engine.add_request(prompt.value, sp))
        except (ValueError, TypeError) as e:
            raise UsageError(f"{prompt.where}: {e}") from None
    return ids


def _generate(engine, ids: list[int], out: JsonlOutput, progress: bool) -> bool:
    """Step the engine until every request has finished, writing each one's line as it finishes.

    Returns True if no request ended with an error.
    """
    pending = set(ids)
    ok = True
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), unit="req")
    try:
        while pending:
            deltas = engine.step()
            for delta in deltas:
                if delta.finished and delta.request_id in pending:
                    pending.discard(delta.request_id)
                    output = engine.output(delta.request_id, pop=True)
                    ok = ok and output.error is None
                    out.write(_record(output))
                    if bar is not None:
                        bar.update(1)
            if not deltas and not engine.has_unfinished() and pending:
                raise RuntimeError(f"the engine stopped with requests {sorted(pending)} unfinished")
    finally:
        if bar is not None:
            bar.close()
    return ok


def _usage_error(error: BaseException) -> int:
    print(f"eft-fast generate: error: {one_line(error)}", file=sys.stderr)
    return 2


def cmd_generate(args) -> int:
    """Run `eft-fast generate`: 0 when every request succeeded, 1 when some ended with an error,
    2 for a usage error (nothing generated)."""
    try:
        prompts = _read_prompts(args)
        params = _params(args, len(prompts))
        check_device(args.device)
        out = JsonlOutput(args.output)
    except UsageError as e:
        return _usage_error(e)
    generated = False
    engine = None
    try:
        try:
            engine = build_engine(args)
            ids = _add_requests(engine, prompts, params)
        except UsageError as e:
            return _usage_error(e)
        except (ValueError, TypeError, OSError) as e:     # bad models, options or formats
            return _usage_error(UsageError(name_flag(one_line(e))))
        out.begin()
        generated = True
        try:
            ok = _generate(engine, ids, out, progress=not args.no_progress and len(prompts) > 1)
        except OSError as e:
            return _usage_error(UsageError(f"--output {args.output or 'stdout'}: writing failed: {e}"))
        return 0 if ok else 1
    finally:
        if engine is not None:
            engine.close()                                # tensor-parallel workers, if any
        out.close(keep=generated)
