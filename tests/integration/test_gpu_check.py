"""`make gpu-check` end to end on this CPU machine: every step writes its JSON; the steps that need
CUDA say so and run their CPU part, briefly; nothing is left running."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the check: on a GPU machine, run `make gpu-check` itself")
def test_the_check_runs_on_the_cpu_and_says_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CI": "true", "DS_ACCELERATOR": "cpu"}
    # The budgets are sized for a GPU node; a loaded 2-core CI machine gets ample room, since what
    # is tested here is what the check runs and reports, not how fast.
    command = [sys.executable, "tools/gpu_check.py", "--out", str(out), "--work", str(tmp_path / "work"), "--budget-scale", "6"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["1-env", "2-tests", "3-loss", "4-step", "5-pipeline"]
    reports = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["env", "tests", "loss", "step", "pipeline"]
    assert all(not r.get("timed_out") for r in reports.values()), reports
    env_report = reports["1-env"]
    assert env_report["cuda"] is False and env_report["packages"]["torch"] and env_report["python"]
    tests = reports["2-tests"]
    assert tests["skipped"] == "no CUDA" and tests["counts"]["tests"] > 0 and tests["counts"]["failures"] == tests["counts"]["errors"] == 0
    loss = reports["3-loss"]
    assert loss["skipped"] == "no CUDA" and loss["cpu"]["returncode"] == 0
    assert set(loss["cpu"]["report"]["backends"]) == {"reference", "chunked"}
    assert all("error" not in v for v in loss["cpu"]["report"]["backends"].values())
    step = reports["4-step"]
    assert step["skipped"] == "no CUDA" and step["cpu"]["returncode"] == 0, step
    configs = step["cpu"]["report"]["configs"]
    assert [c["name"] for c in configs] == ["base", "loss.backend=reference", "plain torch, reference loss"]
    assert all("error" not in c and c["loader"] == "synthetic" and c["samples_per_s"] > 0 for c in configs), configs
    assert configs[0]["samples_digest"] == configs[2]["samples_digest"]  # the baseline ran on the same batches
    pipeline = reports["5-pipeline"]
    assert pipeline["profile"]["returncode"] == 0 and pipeline["profile"]["report"]["ratio"] > 0
    assert "no CUDA" in pipeline["skipped"]
