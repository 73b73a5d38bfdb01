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


def _json_in(out: str) -> dict:
    """The --json report among whatever else DeepSpeed printed to stdout."""
    lines = out.splitlines()
    start, end = lines.index("{"), len(lines) - 1 - lines[::-1].index("}")
    return json.loads("\n".join(lines[start : end + 1]))


def _check_config(c: dict) -> None:
    assert "error" not in c, c.get("error")
    for step in c["per_step"]:  # each measured step, not only the medians
        assert abs(sum(step["stages_ms"].values()) - step["step_ms"]) <= 0.10 * step["step_ms"]
    for stage in ("data_wait", "vision_fwd", "text_fwd", "loss", "backward", "optimizer"):
        assert c["stages_ms"][stage] > 0, stage
    assert c["samples_per_s"] == pytest.approx(16 / (c["step_ms"] / 1e3))
    assert 0 <= c["data_stall"] < 1 and c["peak_memory_bytes"] > 0 and c["mfu"] > 0
    assert c["loader_alone"]["decode_augment_ms"] >= 0 and c["loader_alone"]["read_ms"] > 0


def test_stages_add_up_and_a_comparison_reads_the_same_samples(beton: Path, tmp_path: Path, capsys) -> None:
    from trainer.cli import main

    png = tmp_path / "breakdown.png"
    argv = ["profile", "step", "--config", "tiny_cpu", "--data", str(beton), *COMMON, "--same-process", "--warmup", "1",
            "--steps", "3", "--json", "--png", str(png),
            "--compare", "", "data.loader=reference", "engine.micro_batches=2 loss.backend=reference"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    report = _json_in(capsys.readouterr().out)
    names = [c["name"] for c in report["configs"]]
    assert names == ["base", "data.loader=reference", "engine.micro_batches=2 loss.backend=reference"]
    for c in report["configs"]:
        _check_config(c)
    assert report["configs"][1]["loader"] == "reference" and report["configs"][0]["loader"] == "dali-cpu"
    assert len({c["samples_digest"] for c in report["configs"]}) == 1  # every loader read the same samples, step by step
    for c in report["configs"][1:]:
        assert c["step_ratio"] == pytest.approx(c["step_ms"] / report["configs"][0]["step_ms"])
    assert len({c["peak_flops"] for c in report["configs"]}) == 1  # one peak for all: MFUs compare
    with Image.open(png) as image:
        assert image.format == "PNG"
    # A different seed draws other samples: the digest tells them apart.
    assert main([*argv[:-4], "--compare", "run.seed=1"]) == 0
    again = _json_in(capsys.readouterr().out)
    assert again["configs"][0]["samples_digest"] != report["configs"][0]["samples_digest"]


def test_bad_input_is_one_line(beton: Path, capsys) -> None:
    from trainer.cli import main

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
    command = [*launcher, "--module", "trainer.cli", "profile", "step", "--config", "tiny_cpu", "--data", str(beton), *COMMON,
               "--warmup", "1", "--steps", "3", "--json", "--compare", "", "engine.zero_stage=2"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _json_in(proc.stdout)
    for c in report["configs"]:
        _check_config(c)
        assert c["world"] == 2 and c["stages_ms"]["grad_reduce"] > 0
