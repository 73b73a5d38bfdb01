"""The real `slip demo` entry point end to end, and the command line's one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import demo_dataset as shapes
from slip.main import main

SLIP = [sys.executable, "-m", "slip"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(SLIP + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run(["demo", "--out", str(out), "schedule.steps=3", f"data.root={tmp_path / 'data'}", "data.batch_size=32"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in ("zeroshot_top1_untrained", "zeroshot_top1_trained", "chance"):
        assert 0.0 <= results[key] <= 1.0
    assert results["chance"] == pytest.approx(1 / (len(shapes.COLOURS) * len(shapes.SHAPES)))
    assert results["steps"] == 3
    assert "zero-shot top-1" in proc.stdout and "chance" in proc.stdout
    # What made the run is recorded beside it.
    assert (out / "config.yaml").is_file() and (out / "provenance.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    for key in ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc", "lr", "logit_scale", "samples_per_s", "data_ms", "step_ms"):
        assert key in records[-1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("slip: error: ") and "\n" not in err, err
    return err


def test_missing_config_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = _one_line_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: no such file" in err


def test_unknown_recipe(capsys: pytest.CaptureFixture) -> None:
    assert "unknown recipe 'slip_vitx16'" in _one_line_error(capsys, ["train", "--config", "slip_vitx16"])


def test_bad_override(capsys: pytest.CaptureFixture) -> None:
    assert "unknown key 'optim.lrr'" in _one_line_error(capsys, ["train", "--config", "tiny_cpu", "optim.lrr=1"])


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> Path:
    return make_shapes_beton(tmp_path_factory.mktemp("beton"), train_size=16)


def test_missing_beton(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = _one_line_error(capsys, ["train", "--config", "tiny_cpu", f"data.train={tmp_path / 'absent'}"])
    assert "absent: no such dataset directory" in err


def test_truncated_beton(capsys: pytest.CaptureFixture, small_beton: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small_beton.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".beton" else data)
    err = _one_line_error(capsys, ["train", "--config", "tiny_cpu", f"data.train={broken}"])
    assert "shard-00000.beton: truncated" in err


def test_console_script_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    proc = _run(["train", "--config", "no_such_recipe"], tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("slip:")]
    assert lines == ["slip: error: config: unknown recipe 'no_such_recipe'; known: " + lines[0].split("known: ")[1]]


@pytest.mark.slow
def test_train_bf16_records_the_config_in_its_checkpoint(small_beton: Path, tmp_path: Path) -> None:
    import torch

    args = ["train", "--config", "tiny_cpu", f"data.train={small_beton}", "data.batch_size=8", "schedule.steps=2",
            "engine.precision=bf16", f"run.out={tmp_path}", "run.name=bf16", "run.log_every=1"]  # fmt: skip
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    checkpoint = tmp_path / "bf16" / "checkpoints" / "step-00000002"
    assert (tmp_path / "bf16" / "checkpoints" / "latest").read_text() == "step-00000002"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == 2
    assert meta["config"]["engine"]["precision"] == "bf16" and meta["config"]["data"]["train"] == str(small_beton)
    torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=True)  # DeepSpeed's own file loads safely
