"""`eft-fast check`: one command that tells the first person on a GPU machine whether every GPU
path is right and how fast it is.

It runs, each in its own process: the device tests (`pytest -m gpu` over the test suite on
CUDA; on the CPU, tests/test_device_backends.py, whose GPU legs then skip with "needs a CUDA
device"), the op benchmark (`eft-fast bench --op`) and the engine benchmark (`eft-fast bench`),
prints a pass / fail line per stage, and writes everything to ``OUT/check.json`` (the benchmarks'
own JSON included). Exit status 0 when every stage passed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .child_env import child_python_env

STAGE_TIMEOUT_S = 3600


@dataclass
class StageResult:
    name: str
    ok: bool
    seconds: float
    command: list[str]
    summary: str
    details: dict = field(default_factory=dict)


def _run(command: list[str], timeout_s: float) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_python_env())
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = -1, f"timed out after {timeout_s} s\n{e.stdout or ''}"
    return code, output, time.perf_counter() - start


def _junit_counts(path: Path) -> dict:
    """passed / failed / skipped counts, failing test ids and skip reasons of a JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    if not path.is_file():
        return counts
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            reason = (skip.get("message") or "").split(": ", 1)[-1]
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def run_tests(device: str, tests: list[str], out_dir: Path) -> StageResult:
    report = out_dir / "tests.xml"
    selection = ["-m", "gpu"] if device == "cuda" else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *selection, *tests]
    code, output, seconds = _run(command, STAGE_TIMEOUT_S)
    counts = _junit_counts(report)
    ok = code == 0 and counts["failed"] == 0 and counts["passed"] > 0
    reasons = "; ".join(f"{n} skipped: {r}" for r, n in counts["skip_reasons"].items())
    summary = f"{counts['passed']} passed, {counts['failed']} failed" + (f", {reasons}" if reasons else "")
    if code not in (0, 1) and not counts["failed"]:
        summary += f" (pytest exited with {code}: {output.strip().splitlines()[-1] if output.strip() else ''})"
    return StageResult("tests", ok, seconds, command, summary, {**counts, "exit_code": code})


def run_bench(name: str, args: list[str], device: str, quick: bool, out_dir: Path, json_name: str) -> StageResult:
    bench_dir = out_dir / name
    command = [sys.executable, "-m", "eft_fast.cli", "bench", *args, "--device", device, "--out", str(bench_dir),
               *(["--quick"] if quick else [])]
    code, output, seconds = _run(command, STAGE_TIMEOUT_S)
    path = bench_dir / json_name
    results = json.loads(path.read_text()) if path.is_file() else None
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    summary = f"results in {path}" if code == 0 and results is not None else f"exit {code}: {tail}"
    return StageResult(name, code == 0 and results is not None, seconds, command, summary,
                       {"results": results, "output_tail": output[-4000:]})


def run_check(device: str, out_dir: Path, *, tests: list[str], quick: bool, benchmarks: bool = True
              ) -> list[StageResult]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = [run_tests(device, tests, out_dir)]
    if benchmarks:
        stages.append(run_bench("op_bench", ["--op"], device, quick, out_dir, "op_bench.json"))
        stages.append(run_bench("engine_bench", ["--no-progress"], device, quick, out_dir, "engine_bench.json"))
    (out_dir / "check.json").write_text(json.dumps({"device": device, "stages": [asdict(s) for s in stages]},
                                                   indent=2, default=str))
    return stages


def default_tests(device: str) -> list[str] | None:
    """The test paths of a source checkout (the tests are not installed with the package)."""
    root = Path(__file__).resolve().parent.parent / "tests"
    if not root.is_dir():
        return None
    return [str(root)] if device == "cuda" else [str(root / "test_device_backends.py")]
