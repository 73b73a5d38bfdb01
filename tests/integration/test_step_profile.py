"""`slip profile step`: the stages of the real training step add up to the step, and a
comparison runs every configuration on the same samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data.batch_size=16", "data.threads=1"]


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> Path:
    return make_shapes_beton(tmp_path_factory.mktemp("profile"), train_size=64)


_HELD = []


def _held_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _HELD.append(s)  # kept open (and the port taken) for the session
    return s.getsockname()[1]


def _json_in(out: str) -> dict:
    """The --json report among whatever else DeepSpeed printed to stdout."""
    lines = out.splitlines()
    start, end = lines.index("{"), len(lines) - 1 - lines[::-1].index("}")
    return json.loads("\n".join(lines[start : end + 1]))


def _check_config(c: dict) -> None:
    assert "error" not in c, c.get("error")
    steps = [sum(row.values()) for row in c["per_step"]]
    assert len(steps) == c["steps"] and all(v >= 0 for row in c["per_step"] for v in row.values())
    # The stages, summed per step, against the wall clock read around the measured steps.
    assert abs(sum(steps) / len(steps) - c["wall_ms"]) <= 0.10 * c["wall_ms"]
    for stage in ("data_wait", "vision_fwd", "text_fwd", "loss", "backward", "optimizer"):
        assert c["stages_ms"][stage] > 0, stage
    assert c["samples_per_s"] == pytest.approx(16 / (c["step_ms"] / 1e3))
    assert 0 <= c["data_stall"] < 1 and c["peak_memory_bytes"] > 0
    assert (c["mfu"] is None and c["mfu_note"]) or 0 < c["mfu"] <= 1  # n/a when the CPU peak is not a true bound
    assert c["loader_alone"]["decode_augment_ms"] >= 0 and c["loader_alone"]["read_ms"] > 0


def test_stages_add_up_and_a_comparison_reads_the_same_samples(beton: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from slip.main import main

    # As after an in-process training run: this process holds a process group's port. The
    # fresh processes of a comparison must not try to listen on it.
    monkeypatch.setenv("MASTER_PORT", str(_held_port()))

    png = tmp_path / "breakdown.png"
    base = ["profile", "step", "--config", "tiny_cpu", "--data", str(beton), *COMMON, "--warmup", "1", "--steps", "3", "--json"]
    capsys.readouterr()
    # Each configuration in a fresh process (the default).
    assert main([*base, "--png", str(png), "--compare", "", "data.loader=pil engine.micro_batches=2"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the report alone; DeepSpeed's logs went to stderr
    assert [c["name"] for c in report["configs"]] == ["base", "data.loader=pil engine.micro_batches=2"]
    for c in report["configs"]:
        _check_config(c)
    assert report["configs"][1]["loader"] == "pil" and report["configs"][0]["loader"] == "dali-cpu"
    first = report["configs"][0]
    assert report["configs"][1]["samples_digest"] == first["samples_digest"]  # the PIL loader read the same samples
    assert report["configs"][1]["step_ratio"] == pytest.approx(report["configs"][1]["step_ms"] / first["step_ms"])
    with Image.open(png) as image:
        assert image.format == "PNG"
    # In this process, one after another: the same samples unless the seed changes.
    monkeypatch.undo()  # (a process that held a group's port has that group initialised: not simulated here)
    assert main([*base, "--same-process", "--compare", "loss.backend=reference", "run.seed=1"]) == 0
    again = _json_in(capsys.readouterr().out)
    for c in again["configs"]:
        _check_config(c)
    assert again["configs"][0]["samples_digest"] == first["samples_digest"]
    assert again["configs"][1]["samples_digest"] != first["samples_digest"]
    assert len({c["peak_flops"] for c in [*report["configs"], *again["configs"]]}) <= 2  # one peak per comparison


def test_a_delay_shows_in_its_stage(beton: Path, monkeypatch) -> None:
    """An oracle for the attribution: a known sleep put into the optimizer step and into each
    gradient all-reduce must appear in those stages, and only there."""
    import time

    import deepspeed.comm as ds_comm
    from deepspeed.runtime.engine import DeepSpeedEngine

    from profiling.step_profile import profile_step
    from trainer.config import load_config

    calls = {"all_reduce": 0}
    step, all_reduce = DeepSpeedEngine.step, ds_comm.all_reduce

    def slow_step(self, *a, **k):
        time.sleep(0.05)
        return step(self, *a, **k)

    def slow_all_reduce(*a, **k):
        calls["all_reduce"] += 1
        time.sleep(0.02)
        return all_reduce(*a, **k)

    cfg = load_config("tiny_cpu", [f"data.train={beton}", *COMMON])
    plain = profile_step(cfg, warmup=1, steps=3, peak=(1e12, "given"))
    monkeypatch.setattr(DeepSpeedEngine, "step", slow_step)
    monkeypatch.setattr(ds_comm, "all_reduce", slow_all_reduce)
    slow = profile_step(cfg, warmup=1, steps=3, peak=(1e12, "given"))
    assert calls["all_reduce"] > 0
    per_step_reduces = calls["all_reduce"] / 4  # 1 warm-up + 3 measured steps
    # At least the sleep; the rest is this shared machine's noise between two runs.
    assert 45 <= slow["stages_ms"]["optimizer"] - plain["stages_ms"]["optimizer"] < 200
    assert slow["stages_ms"]["grad_reduce"] >= 20 * per_step_reduces * 0.9
    for stage in ("vision_fwd", "backward"):  # unchanged within this machine's noise
        assert slow["stages_ms"][stage] < plain["stages_ms"][stage] * 1.5 + 10


def test_bad_input_is_one_line(beton: Path, capsys) -> None:
    from slip.main import main

    assert main(["profile", "step", "--config", "tiny_cpu", "--compare", "", "data.nope=1", "--data", str(beton)]) == 2
    assert "data.nope" in capsys.readouterr().err
    assert main(["profile", "step", "--config", "tiny_cpu"]) == 2
    assert "data.train is empty" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_show_the_gradient_reduction(beton: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(CI="true", DS_ACCELERATOR="cpu")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port)]
    command = [*launcher, "--module", "slip", "profile", "step", "--config", "tiny_cpu", "--data", str(beton), *COMMON,
               "--warmup", "1", "--steps", "3", "--json", "--compare", "", "engine.zero_stage=2"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _json_in(proc.stdout)
    for c in report["configs"]:
        _check_config(c)
        assert c["world"] == 2 and c["stages_ms"]["grad_reduce"] > 0
