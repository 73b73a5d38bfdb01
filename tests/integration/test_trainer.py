"""The DeepSpeed trainer end to end on the CPU: resume, checkpoints under failure, ZeRO stages,
the non-finite guard, GradCache and export. The oracle is always an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.rewind import rewind
from trainer.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
# Views that depend on the sample only (full-image crops, no colour or flip draws): what a
# comparison across different numbers of ranks needs, since each rank's DALI draws its own.
DETERMINISTIC_VIEWS = [
    "augment.clip_scale=[1.0, 1.0]", "augment.ssl_scale=[1.0, 1.0]", "augment.jitter_p=0.0",
    "augment.grayscale_p=0.0", "augment.blur_p=0.0", "augment.flip_p=0.0",
]  # fmt: skip

LOGGED = ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc", "logit_scale", "lr")


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> Path:
    return make_shapes_beton(tmp_path_factory.mktemp("trainer"), seed=3, train_size=96)


def _overrides(beton: Path, out: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        f"data.train={beton}", f"run.out={out}", f"run.name={name}", f"schedule.steps={steps}", "data.batch_size=16",
        "run.log_every=1", "run.tensorboard=false", "data.threads=2", "schedule.warmup_epochs=0.25", *extra,
    ]  # fmt: skip


def _cfg(beton: Path, out: Path, name: str, steps: int, *extra: str) -> Config:
    return load_config("tiny_cpu", _overrides(beton, out, name, steps, *extra))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], *(r[k] for k in LOGGED)) for r in _records(run_dir)]


def _train(cfg: Config):
    from trainer.loop import train

    return train(cfg, progress=False)


def test_sigterm_checkpoints_and_the_resumed_run_is_bitwise_the_straight_one(beton: Path, tmp_path: Path) -> None:
    straight = _train(_cfg(beton, tmp_path, "straight", 8))
    assert straight.steps == 8 and not straight.stopped_by_signal

    cfg = _cfg(beton, tmp_path, "stopped", 8, "run.checkpoint_every=100")
    metrics = cfg.run_dir / "metrics.jsonl"

    def send_sigterm_after_two_steps() -> None:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=send_sigterm_after_two_steps, daemon=True)
    killer.start()
    first = _train(cfg)
    killer.join()
    assert first.stopped_by_signal and 2 <= first.steps < 8
    assert (cfg.run_dir / "checkpoints" / "latest").read_text() == f"step-{first.steps:08d}"

    second = _train(cfg)
    assert second.resumed_from == first.steps and second.steps == 8
    assert _curve(cfg.run_dir) == _curve(straight.run_dir)  # every step once, every value bit for bit


def test_export_of_a_trained_run_reloads_without_deepspeed_to_the_same_embeddings(beton: Path, tmp_path: Path) -> None:
    from slip.main import main
    from trainer.weights import load_model

    result = _train(_cfg(beton, tmp_path, "exported", 3))
    out = tmp_path / "slip.safetensors"
    assert main(["export", str(result.run_dir), "--out", str(out)]) == 0
    reloaded = load_model(out)
    trained = result.model.eval()
    g = torch.Generator().manual_seed(7)
    views = {k: torch.randn(4, 3, 64, 64, generator=g) for k in ("image", "aug1", "aug2")}
    text = torch.randint(1, 49407, (4, 77), generator=g)
    with torch.no_grad():
        want, got = trained(text=text, **views), reloaded(text=text, **views)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "micro_batches"), [(0, 1), (1, 1), (2, 1), (3, 1), (2, 2)])
def test_every_zero_stage_trains_and_resumes_exactly(beton: Path, tmp_path: Path, stage: int, micro_batches: int) -> None:
    extra = [f"engine.zero_stage={stage}", f"engine.micro_batches={micro_batches}", "run.checkpoint_every=2"]
    cfg = _cfg(beton, tmp_path, f"zero{stage}_{micro_batches}", 4, *extra)
    _train(cfg)
    straight = _curve(cfg.run_dir)
    assert straight[-1][1] < straight[0][1] * 1.5 and all(map(torch.isfinite, torch.tensor([c[1] for c in straight])))
    rewind(cfg.run_dir, 2)
    resumed = _train(cfg)
    assert resumed.resumed_from == 2
    assert _curve(cfg.run_dir) == straight


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_resumes_from_the_last_complete_checkpoint(beton: Path, tmp_path: Path) -> None:
    overrides = _overrides(beton, tmp_path, "killed", 6, "run.checkpoint_every=2")
    straight = _train(load_config("tiny_cpu", _overrides(beton, tmp_path, "straight", 6)))
    # The second checkpoint dies after DeepSpeed's files and the weights are written, before it is complete.
    script = f"""
import os, signal, sys
import trainer.checkpoint as ck
from slip.main import main
saves = []
original = ck.write_json_atomic
def dying_write(path, payload):
    saves.append(path)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, payload)
ck.write_json_atomic = dying_write
sys.exit(main(["train", "--config", "tiny_cpu", *{overrides!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000002"
    assert (checkpoints / "step-00000004.partial").is_dir() and not (checkpoints / "step-00000004").exists()

    from slip.main import main

    assert main(["train", "--config", "tiny_cpu", *overrides]) == 0
    assert _curve(tmp_path / "killed") == _curve(straight.run_dir)
    assert not list(checkpoints.glob("*.partial"))  # the next save cleared the wreck
    assert sorted(d.name for d in checkpoints.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000006"]


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_named_and_the_run_resumes_exactly_from_the_one_before(
    beton: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from slip.main import main

    command = ["train", "--config", "tiny_cpu", *_overrides(beton, tmp_path, "damaged", 4, "run.checkpoint_every=1")]
    assert main(command) == 0
    run_dir, checkpoints = tmp_path / "damaged", tmp_path / "damaged" / "checkpoints"
    straight = _curve(run_dir)
    rewind(run_dir, 3)  # died after checkpointing step 3: steps 2 and 3 are kept
    states = checkpoints / "step-00000003" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size * 2 // 3])
    capsys.readouterr()
    assert main(command) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"slip: warning: {states}: truncated"), err
    assert lines[0].endswith(f"using the older checkpoint {checkpoints / 'step-00000002'}"), err
    assert f"resumed from {checkpoints / 'step-00000002'} at step 2 of 4 (epoch " in out
    assert _curve(run_dir) == straight  # every step once, every value bit for bit

    for d in checkpoints.glob("step-*"):
        (d / "checksums.json").write_bytes(b"")
    assert main(command) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"slip: error: {run_dir}: no intact checkpoint ({checkpoints / 'step-00000004' / 'checksums.json'}: empty"), err


def test_non_finite_losses_are_skipped_counted_and_stop_the_run_when_they_persist(
    beton: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.build
    from trainer.task import TrainingTask

    poisoned: set[int] = {1, 2}
    calls = []

    class PoisonedTask(TrainingTask):
        def __call__(self, model, batch):
            losses = super().__call__(model, batch)
            calls.append(len(calls))
            if calls[-1] in poisoned:
                losses["loss"] = losses["loss"] * float("nan")
            return losses

    monkeypatch.setattr(trainer.build, "TrainingTask", PoisonedTask)
    result = _train(_cfg(beton, tmp_path, "nan", 5, "run.max_nonfinite=3"))
    records = _records(result.run_dir)
    assert result.steps == 5 and [r["nonfinite_skipped"] for r in records] == [0, 1, 2, 2, 2]
    # A skipped step leaves the weights alone: the logit scale moves only on the steps that ran.
    scales = [r["logit_scale"] for r in records]  # each the scale the step's forward used
    assert scales[1] == scales[2] == scales[3] != scales[4]

    from slip.main import main
    from trainer.loop import TrainingStopped

    poisoned.update(range(100))
    calls.clear()
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row at step 2"):
        _train(_cfg(beton, tmp_path, "nan_stop", 8, "run.max_nonfinite=3"))
    meta = json.loads((tmp_path / "nan_stop" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["counters"]["nonfinite_skipped"] == 3
    calls.clear()
    assert main(["train", "--config", "tiny_cpu", *_overrides(beton, tmp_path, "nan_cli", 8, "run.max_nonfinite=2")]) == 3


def test_grad_cache_accumulation_trains_like_one_big_batch(beton: Path, tmp_path: Path) -> None:
    one = _train(_cfg(beton, tmp_path, "micro1", 3))
    four = _train(_cfg(beton, tmp_path, "micro4", 3, "engine.micro_batches=4"))
    a, b = _records(one.run_dir), _records(four.run_dir)
    for x, y in zip(a, b):
        for key in ("loss", "clip_loss", "ssl_loss", "logit_scale"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["step"], key)


def test_a_finished_run_is_not_trained_again_and_a_changed_model_is_refused(beton: Path, tmp_path: Path) -> None:
    cfg = _cfg(beton, tmp_path, "done", 2)
    _train(cfg)
    again = _train(cfg)
    assert again.resumed_from == 2 and again.steps == 2
    checkpoints = cfg.run_dir / "checkpoints"
    with pytest.raises(ValueError, match=r"model\.embed_dim is 64 but 128 in the checkpoint .*set model\.embed_dim=128 to resume"):
        _train(_cfg(beton, tmp_path, "done", 2, "model.embed_dim=64"))
    with pytest.raises(ValueError, match="data.loader is synthetic but dali in the checkpoint"):  # its saved state is DALI's
        _train(_cfg(beton, tmp_path, "done", 4, "data.loader=synthetic", "data.allow_synthetic=true"))
    with pytest.raises(ValueError, match=f"data.batch_size is 32 but 16 in the checkpoint .*remove {checkpoints} to start this one over"):
        _train(_cfg(beton, tmp_path, "done", 2, "data.batch_size=32"))
    with pytest.raises(ValueError, match=f"already holds checkpoints; .*another name .*remove {checkpoints} to start this one over"):
        _train(_cfg(beton, tmp_path, "done", 2, "run.resume=false"))
    # The way out both name: the run starts over, with the new batch size, resumed or not.
    shutil.rmtree(checkpoints)
    over = _train(_cfg(beton, tmp_path, "done", 2, "data.batch_size=32", "run.resume=false"))
    assert over.resumed_from == 0 and over.steps == 2 and [r["step"] for r in _records(cfg.run_dir)] == [0, 1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_through_the_deepspeed_launcher_match_one_process(beton: Path, tmp_path: Path) -> None:
    common = ["data.threads=1", "run.checkpoint_every=2", *DETERMINISTIC_VIEWS]
    one = _train(_cfg(beton, tmp_path, "one", 3, *common))

    def launch() -> None:
        launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(_free_port())]
        command = [*launcher, "--module", "trainer.train", "--config", "tiny_cpu", *_overrides(beton, tmp_path, "two", 3, *common)]
        proc = subprocess.run(command, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    launch()
    a, b = _records(one.run_dir), _records(tmp_path / "two")
    assert [r["step"] for r in b] == [0, 1, 2]
    # Killed after its step-2 checkpoint and launched again: the 2-process run resumes exactly.
    straight = _curve(tmp_path / "two")
    rewind(tmp_path / "two", 2)
    launch()
    assert _curve(tmp_path / "two") == straight
    for x, y in zip(a, b):
        for key in ("loss", "clip_loss", "ssl_loss", "logit_scale"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["step"], key)
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["world"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000003").glob("rank-*.pt")) == [
        "rank-00000.pt", "rank-00001.pt",
    ]  # fmt: skip


def _child_env() -> dict[str, str]:
    # An in-process run made this process rank 0 of a world of one, on a port it still holds.
    launched = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in launched}, "CI": "true", "DS_ACCELERATOR": "cpu"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_activation_checkpointing_changes_nothing_but_memory(beton: Path, tmp_path: Path) -> None:
    plain = _train(_cfg(beton, tmp_path, "plain", 2))
    recomputed = _train(_cfg(beton, tmp_path, "recomputed", 2, "engine.activation_checkpointing=true"))
    assert _curve(recomputed.run_dir) == _curve(plain.run_dir)


def test_lamb_trains_through_the_engine(beton: Path, tmp_path: Path) -> None:
    result = _train(_cfg(beton, tmp_path, "lamb", 3, "optim.name=lamb"))
    records = _records(result.run_dir)
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[2]["logit_scale"] != records[0]["logit_scale"]  # it updated the weights
    meta = json.loads((result.run_dir / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["config"]["optim"]["name"] == "lamb"


def test_the_synthetic_loader_trains_only_when_asked_to(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slip.main import main

    base = ["train", "--config", "tiny_cpu", "data.loader=synthetic", f"run.out={tmp_path}", "run.name=s", "schedule.steps=2",
            "data.batch_size=8", "run.log_every=1", "run.tensorboard=false"]  # fmt: skip
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "data.loader=synthetic trains on random tensors" in err and "data.allow_synthetic=true" in err and "\n" not in err
    assert not (tmp_path / "s").exists()
    assert main([*base, "data.allow_synthetic=true"]) == 0  # no data.train: nothing is read
    records = _records(tmp_path / "s")
    assert [r["step"] for r in records] == [0, 1] and all(r["loss"] > 0 for r in records)
    assert json.loads((tmp_path / "s" / "provenance.json").read_text())["data"]["source"] == "synthetic"
