"""The three compute levers in real training runs: patch dropout with its unmasked tuning, a
progressive resolution and light SSL views, together, through the DeepSpeed engine; with
GradCache, activation checkpointing and ZeRO; a run resumed from a checkpoint at, between or
after changes of size is bitwise the straight run. The oracle is the uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.rewind import rewind
from trainer.config import Config, load_config

# 96 samples at batch 16: 6 steps an epoch. Sides 32, 48, 64 px over epochs 0, 1, 2; the SimCLR
# views at half the CLIP view's side, on a 16 px step (16, 16, 32); the last 3 of 16 steps unmasked.
LEVERS = [
    "model.patch_dropout=0.5", "model.ssl_patch_dropout=0.25", "schedule.unmasked_steps=3",
    "augment.ssl_image_size=32", "augment.resolution_start=32", "augment.resolution_ramp=[0, 2]", "augment.resolution_step=16",
]  # fmt: skip
LOGGED = ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc", "logit_scale", "lr", "image_px", "ssl_px", "patch_dropout")


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> Path:
    return make_shapes_beton(tmp_path_factory.mktemp("levers"), seed=5, train_size=96)


def _cfg(beton: Path, out: Path, name: str, *extra: str) -> Config:
    return load_config("tiny_cpu", [
        f"data.train={beton}", f"run.out={out}", f"run.name={name}", "schedule.steps=16", "data.batch_size=16",
        "run.log_every=1", "run.tensorboard=false", "data.threads=2", "schedule.warmup_epochs=0.25", "run.checkpoint_every=2", "run.keep=8",
        *LEVERS, *extra,
    ])  # fmt: skip


def _train(cfg: Config):
    from trainer.loop import train

    return train(cfg, progress=False)


def _curve(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], *(r[k] for k in LOGGED)) for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("engine.zero_stage=2", "engine.micro_batches=2", "engine.activation_checkpointing=true")],
                         ids=["zero0", "zero2-gradcache-checkpointed"])  # fmt: skip
def test_the_levers_follow_their_schedules_and_resume_bitwise(beton: Path, tmp_path: Path, extra: tuple) -> None:
    cfg = _cfg(beton, tmp_path, "levers", *extra)
    result = _train(cfg)
    straight = _curve(cfg.run_dir)
    assert result.steps == 16 and len(straight) == 16
    by_step = {s[0]: s for s in straight}
    sides = [(by_step[s][8], by_step[s][9]) for s in range(16)]
    assert sides == [(32, 16)] * 6 + [(48, 16)] * 6 + [(64, 32)] * 4  # a change at each epoch start
    assert [by_step[s][10] for s in range(16)] == [0.5] * 13 + [0.0] * 3  # the CLIP view's rate, unmasked at the end
    for step in (6, 12) if not extra else (8,):  # at the first change, after the last; inside the second size
        rewind(cfg.run_dir, step)
        resumed = _train(cfg)
        assert resumed.resumed_from == step
        assert _curve(cfg.run_dir) == straight, step
    # Evaluation: every token, at the final size.
    model = result.model.eval()
    assert model.visual.patch_embed.img_size == (64, 64)


@pytest.mark.slow
def test_zero_3_trains_the_levers_as_zero_0(beton: Path, tmp_path: Path) -> None:
    # ZeRO-3 partitions the tower's own parameters (class token, position embedding): the
    # training forward must still gather them, or the steps would differ (or fail).
    plain = _train(_cfg(beton, tmp_path, "zero0", "schedule.steps=4"))
    sharded = _train(_cfg(beton, tmp_path, "zero3", "schedule.steps=4", "engine.zero_stage=3"))
    for a, b in zip(_curve(plain.run_dir), _curve(sharded.run_dir), strict=True):
        assert a[8:] == b[8:] and a[1] == pytest.approx(b[1], rel=1e-5), (a, b)


def test_a_size_the_patch_does_not_divide_is_refused_before_anything_is_built(beton: Path, tmp_path: Path) -> None:
    from trainer.loop import train

    cfg = load_config("tiny_cpu", [f"data.train={beton}", f"run.out={tmp_path}", "augment.ssl_image_size=36"])
    with pytest.raises(ValueError, match="ssl_image_size 36 is not a multiple of tiny's patch size 8"):
        train(cfg, progress=False)
    assert not (tmp_path / cfg.run.name).exists()
