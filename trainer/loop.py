"""The training loop: builds the parts from the config, owns schedule, logging and checkpoints."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler
from trainer.config import Config
from trainer.engine import DistInfo, build_engine, deepspeed_config, init_distributed, pick_device, set_lr
from trainer.metrics import JsonlLogger
from trainer.models import build_model
from trainer.models.contrastive import ContrastiveModel
from trainer.objectives import get_objective
from trainer.optim import build_optimizer
from trainer.provenance import write_provenance
from trainer.schedule import lr_at
from trainer.task import ContrastiveTask

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: temperature never below 0.01


def init_model(cfg: Config) -> ContrastiveModel:
    """The model at step 0; seeded, so every caller (trainer, demo baseline) gets the same weights."""
    torch.manual_seed(cfg.run.seed)
    m = cfg.model
    return build_model(
        m.size,
        get_objective(m.objective).parts,
        image_size=cfg.augment.image_size,
        embed_dim=m.embed_dim,
        ssl_mlp_dim=m.ssl_mlp_dim,
        ssl_emb_dim=m.ssl_emb_dim,
        context_length=m.context_length,
        vocab_size=m.vocab_size,
    )


@dataclass
class Schedule:
    total: int
    warmup: int
    steps_per_epoch: int


def plan_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    s = cfg.schedule
    total = s.steps or max(1, round(s.epochs * steps_per_epoch))
    warmup = min(total, round(s.warmup_epochs * steps_per_epoch))
    return Schedule(total, warmup, steps_per_epoch)


@dataclass
class TrainResult:
    model: ContrastiveModel
    steps: int
    last: dict[str, float]
    run_dir: Path
    dist: DistInfo


def _clamp_logit_scale(model: torch.nn.Module) -> None:
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        with torch.no_grad():
            scale.clamp_(0, MAX_LOGIT_SCALE)


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    dataset = BetonDataset(cfg.data.train)  # before any process group: a bad path fails fast, on every rank
    device = pick_device(cfg.engine.device)
    dist = init_distributed(device)
    run_dir = cfg.run_dir
    if dist.is_main:
        cfg.dump(run_dir / "config.yaml")
        write_provenance(run_dir / "provenance.json", dataset.manifest)

    objective = get_objective(cfg.model.objective)
    model = init_model(cfg).to(dist.device)
    o = cfg.optim
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, o.betas, o.eps)
    ds_cfg = deepspeed_config(
        cfg.data.batch_size, dist.world, zero_stage=cfg.engine.zero_stage, precision=cfg.engine.precision, grad_clip=o.grad_clip
    )
    engine = build_engine(model, optimizer, ds_cfg)
    task = ContrastiveTask(objective, cfg.loss, dist.group)

    sampler = EpochSampler(len(dataset), cfg.data.batch_size, seed=cfg.run.seed, rank=dist.rank, world=dist.world)
    plan = plan_schedule(cfg, sampler.steps_per_epoch)
    loader = ThreeViewLoader(
        dataset,
        sampler,
        objective.views,
        cfg.augment,
        text=objective.text,
        device="gpu" if device == "cuda" else "cpu",
        threads=cfg.data.threads,
        prefetch=cfg.data.prefetch,
        seed=cfg.run.seed * 1000 + dist.rank,
    )
    logger = JsonlLogger(run_dir / "metrics.jsonl", enabled=dist.is_main)
    quiet = not progress or not dist.is_main or os.environ.get("CI") == "true"
    bar = tqdm(total=plan.total, desc=f"train {cfg.model.objective}-{cfg.model.size}", unit="step", disable=quiet)
    last: dict[str, float] = {}
    for step in range(plan.total):
        lr = lr_at(step, total=plan.total, warmup=plan.warmup, peak=o.lr, start=cfg.schedule.start_lr, end=cfg.schedule.end_lr)
        set_lr(engine, lr)
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        losses = task(engine, batch)
        engine.backward(losses["loss"])
        engine.step()
        _clamp_logit_scale(engine.module)
        t2 = time.perf_counter()
        last = {k: float(v) for k, v in losses.items()}
        samples_per_s = cfg.data.batch_size / (t2 - t0)
        bar.set_postfix(loss=f"{last['loss']:.3f}", samples_s=f"{samples_per_s:.0f}")
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == plan.total - 1:
            record: dict[str, Any] = {"step": step, "epoch": step / plan.steps_per_epoch, "lr": lr, **last}
            record.update(samples_per_s=samples_per_s, data_ms=1e3 * (t1 - t0), step_ms=1e3 * (t2 - t0))
            logger.write(record)
    bar.close()
    logger.close()
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=f"step-{plan.total:08d}", client_state={"step": plan.total})
    return TrainResult(engine.module, plan.total, last, run_dir, dist)
