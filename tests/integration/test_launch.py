"""Runs under DeepSpeed's launcher on 2 CPU ranks: a config error is reported once and at once,
and a run keeps nothing in /dev/shm or the temp directory at any moment, so however it ends
(even SIGKILL) it leaves nothing there."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
AUTOGRAPH_FILES = "__autograph_generated_file*.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(port: int, args: list[str], tmp: Path, **popen) -> subprocess.Popen:
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(CI="true", DS_ACCELERATOR="cpu", TMPDIR=str(tmp))
    tmp.mkdir(exist_ok=True)
    command = [*launcher, "--module", "trainer.train", "--config", "tiny_cpu", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def _shm_buffers(port: int) -> list[Path]:
    """This run's DeepSpeed all-reduce buffers: their names carry its master port."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_config_error_under_the_launcher_is_reported_once_and_at_once(tmp_path: Path) -> None:
    port = _free_port()
    t0 = time.perf_counter()
    proc = _launch(port, [f"data.train={tmp_path / 'none'}", "data.batch_size=15"], tmp_path / "tmp", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if "error: config" in line]
    assert errors == ["slip: error: config: data.batch_size 15 is not divisible by 2 ranks"], out[-3000:]
    # The launcher alone imports DeepSpeed (seconds); the ranks stop before torch is imported
    # (tests/unit/trainer/test_entry_point.py checks that). The bound only catches the old minute
    # of every rank joining the group and building the model, with room for a loaded machine.
    assert elapsed < 120, f"{elapsed:.0f} s"
    assert _shm_buffers(port) == [] and list((tmp_path / "tmp").glob(AUTOGRAPH_FILES)) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_launched_run_holds_nothing_in_dev_shm_or_tmp_even_when_killed(tmp_path: Path, make_shapes_beton) -> None:
    beton = make_shapes_beton(tmp_path / "data", seed=5, train_size=64)
    port, run_dir = _free_port(), tmp_path / "runs" / "killed"
    args = [f"data.train={beton}", f"run.out={run_dir.parent}", f"run.name={run_dir.name}", "schedule.steps=500", "data.batch_size=16",
            "data.threads=1", "run.log_every=1", "run.tensorboard=false"]  # fmt: skip
    log = (tmp_path / "launch.log").open("w")
    proc = _launch(port, args, tmp_path / "tmp", stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        metrics = run_dir / "metrics.jsonl"
        # Training, so both ranks have joined the group and built DALI's graphs.
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(1)
        assert _shm_buffers(port) == []
        assert list((tmp_path / "tmp").glob(AUTOGRAPH_FILES)) == []
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, with no chance to clean up
        proc.wait(timeout=60)
        log.close()
    assert _shm_buffers(port) == []
    assert list((tmp_path / "tmp").glob(AUTOGRAPH_FILES)) == []
