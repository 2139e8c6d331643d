"""The entry point: `python -m dfkd_jax.main --config=configs/teacher.py[:preset]` (the README's main command)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd_jax.main", *args], capture_output=True, text=True, cwd=REPO)


def test_teacher_job_converts_once_evaluates_and_records(shared, tmp_path):
    workdir = tmp_path / "run"
    first = run_main("--config=configs/teacher.py:chenyaofo_resnet20", f"--workdir={workdir}")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1]) == {"top1": round(100 * 861 / 932, 4), "n": 932}
    results = json.loads((workdir / "results.json").read_text())
    assert results["arch"] == "resnet20" and results["shortcut"] == "B" and results["correct"] == 861
    assert json.loads((workdir / "config.json").read_text())["teacher"]["arch"] == "resnet20"

    second = run_main("--config=configs/teacher.py:chenyaofo_resnet20", f"--workdir={workdir}")
    assert second.returncode == 0, second.stderr
    assert "using the teacher converted earlier" in second.stderr
    assert second.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]

    # A workdir holding another teacher is refused, not silently mixed.
    other = run_main("--config=configs/teacher.py:chenyaofo_resnet32", f"--workdir={workdir}")
    assert other.returncode != 0
    assert "holds a resnet20, but the config asks for resnet32" in other.stderr
