"""`eft-fast check`: a pass/fail line per stage and check.json; a failing test fails the check."""
from __future__ import annotations

import json
from pathlib import Path

from eft_fast.cli import main

HERE = Path(__file__).resolve().parent


def test_check_passes_and_writes_json(tmp_path, capsys):
    rc = main(["check", "--device", "cpu", "--no-bench", "--out", str(tmp_path),
               "--tests", f"{HERE / 'test_device_backends.py'}::test_gpu_legs_exist"])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS  tests" in out and "1 passed, 0 failed" in out
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["device"] == "cpu" and [s["name"] for s in report["stages"]] == ["tests"]
    assert report["stages"][0]["details"]["passed"] == 1


def test_a_failing_test_fails_the_check(tmp_path, capsys):
    bad = tmp_path / "test_bad.py"
    bad.write_text("def test_ok():\n    pass\n\ndef test_broken():\n    assert 1 == 2\n")
    rc = main(["check", "--device", "cpu", "--no-bench", "--out", str(tmp_path / "out"), "--tests", str(bad)])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL  tests" in out and "1 passed, 1 failed" in out
    details = json.loads((tmp_path / "out" / "check.json").read_text())["stages"][0]["details"]
    assert len(details["failures"]) == 1 and details["failures"][0].endswith("test_bad::test_broken")
