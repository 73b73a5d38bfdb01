"""The logit scale is clamped in place after every optimizer step, not in the forward.

A forward clamp zeroes the parameter's gradient once it passes ln 100, so a scale that got
there could never come down. The oracle is a plain torch model and torch's AdamW, with
`clamp_` on the parameter after each step; the trainer's optimizer (and DeepSpeed's engine
around it, at every ZeRO stage and precision) must give the same scale after each step, and
under ZeRO the optimizer's fp32 master must hold the clamped value too.
"""
from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from trainer.models import build_model  # noqa: E402
from trainer.objectives import OBJECTIVES  # noqa: E402
from trainer.optim import build_optimizer, param_groups  # noqa: E402

BOUND = math.log(100)
LR, WD = 0.5, 0.1
BETAS = (0.0, 0.999)  # no momentum: each step moves the scale the way its own gradient says
B = 8
# The push on the scale each step: +1 its gradient says decrease, -1 increase.
DIRECTIONS = (+1, -1, +1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny", OBJECTIVES["clip"].parts, image_size=16, embed_dim=32)
    with torch.no_grad():
        model.logit_scale.fill_(BOUND + 0.3)  # pushed past the bound (an old checkpoint, a bug)
    return model


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 5000, (B, 77), generator=g)  # (B, 77)
    text[:, 6] = 49407
    text[:, 7:] = 0
    return {"image": torch.randn(B, 3, 16, 16, generator=g), "text": text}  # image (B, 3, 16, 16)


def _loss(out: dict[str, torch.Tensor], direction: int) -> torch.Tensor:
    # The scale's term dominates its gradient; the small one gives every other parameter one.
    embeds = out["image_embed"].float().square().mean() + out["text_embed"].float().square().mean()
    return direction * out["logit_scale"].sum() + 1e-3 * embeds


def _oracle(precision: str) -> list[float]:
    """The raw scale after each step: plain AdamW, then clamp_ on the parameter."""
    model = _model()
    optimizer = torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=1e-8)
    scales = []
    for step, direction in enumerate(DIRECTIONS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = _loss(model(**_batch(step)), direction)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, BOUND)
        scales.append(model.logit_scale.item())
    return scales


def _check_shape(scales: list[float]) -> None:
    assert scales[0] < BOUND - 0.1, scales  # the gradient said decrease: it came back from past the bound
    assert scales[1] == pytest.approx(BOUND, abs=1e-6), scales  # said increase: clamped at the bound
    assert scales[2] < BOUND - 0.1, scales  # said decrease: it left the bound


def test_the_forward_does_not_clamp_and_the_optimizer_does() -> None:
    model = _model()
    out = model(**_batch(0))
    assert out["logit_scale"].item() == pytest.approx(math.exp(BOUND + 0.3))  # the raw parameter's exp
    optimizer = build_optimizer(model, "adamw", LR, WD, BETAS, 1e-8)
    scales = []
    for step, direction in enumerate(DIRECTIONS):
        loss = _loss(model(**_batch(step)), direction)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scales.append(model.logit_scale.item())
    _check_shape(scales)
    assert scales == pytest.approx(_oracle("fp32"), abs=1e-6)


def test_a_scale_above_the_bound_is_clamped_after_a_step_that_would_raise_it() -> None:
    model = _model()
    optimizer = build_optimizer(model, "lamb", LR, WD, (0.9, 0.98), 1e-8)
    loss = _loss(model(**_batch(0)), -1)
    loss.backward()
    optimizer.step()
    assert model.logit_scale.item() == pytest.approx(BOUND, abs=1e-6)  # float32 ln 100


def test_models_without_a_text_tower_have_nothing_to_clamp() -> None:
    model = build_model("tiny", OBJECTIVES["simclr"].parts, image_size=16, ssl_mlp_dim=32, ssl_emb_dim=16)
    assert model.param_bounds() == {}
    build_optimizer(model, "adamw", LR, WD, BETAS, 1e-8)  # registers nothing, fails on nothing


@pytest.fixture(scope="module")
def dist_info():
    from trainer.engine import init_distributed, prebuild_cpu_comm_op

    prebuild_cpu_comm_op()
    return init_distributed("cpu")


def _full_scale(engine: Any) -> tuple[float, float | None]:
    """The module's scale and, under ZeRO, the optimizer's fp32 master of it (both gathered)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from trainer.engine import gathered_module

    param = engine.module.logit_scale
    master = safe_get_full_fp32_param(param) if engine.zero_optimization_stage() > 0 else None
    with gathered_module(engine) as module:
        scale = module.logit_scale.item()
    return scale, None if master is None else master.item()


def _engine_scales(zero_stage: int, precision: str, rank: int = 0, world: int = 1) -> list[float]:
    """The scale after each step of the trainer's optimizer inside DeepSpeed's engine; each rank
    steps on its share of the batch (the scale's gradient does not depend on the rows)."""
    from trainer.engine import build_engine, deepspeed_config, linear_restored

    rows = slice(rank * B // world, (rank + 1) * B // world)
    with linear_restored():
        model = _model()
        optimizer = build_optimizer(model, "adamw", LR, WD, BETAS, 1e-8)
        config = deepspeed_config(B, world, zero_stage=zero_stage, precision=precision, grad_clip=0.0)
        engine = build_engine(model, optimizer, config)
        try:
            scales = []
            for step, direction in enumerate(DIRECTIONS):
                batch = {k: v[rows] for k, v in _batch(step).items()}
                engine.backward(_loss(engine(**batch), direction))
                engine.step()
                scale, master = _full_scale(engine)
                if master is not None:
                    assert master == scale, (step, master, scale)  # the master holds the clamped value
                scales.append(scale)
        finally:
            engine.destroy()
            engine.optimizer = None
    return scales


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_clamps_the_master_as_the_oracle(dist_info, zero_stage: int, precision: str) -> None:
    scales = _engine_scales(zero_stage, precision)
    _check_shape(scales)
    assert scales == pytest.approx(_oracle(precision), abs=1e-5)


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the cores
    from trainer.engine import init_distributed

    init_distributed("cpu")
    torch.save({stage: _engine_scales(stage, "fp32", rank, world) for stage in (1, 2, 3)}, os.path.join(out, f"rank_{rank}.pt"))


@pytest.mark.slow
@pytest.mark.distributed
def test_on_two_ranks_the_rank_holding_the_master_clamps_it(tmp_path) -> None:
    """ZeRO 1-2 keep the scale's master on one rank, ZeRO-3 splits it: both ranks still see the oracle's scale."""
    from ranks import free_port, spawn_ranks

    spawn_ranks(_two_rank_worker, 2, (2, free_port(), str(tmp_path)), timeout_s=300, what="the 2-rank run")
    want = _oracle("fp32")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank_{rank}.pt")
        for stage in (1, 2, 3):
            assert got[stage] == pytest.approx(want, abs=1e-5), (rank, stage, got[stage], want)
