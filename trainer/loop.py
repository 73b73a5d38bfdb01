"""The training loop: builds the parts from the config, owns schedule, logging and checkpoints."""
from __future__ import annotations

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
from trainer.engine import (
    DistInfo,
    build_engine,
    deepspeed_config,
    init_distributed,
    parallelize,
    pick_device,
    reduce_mean,
    set_lr,
)
from trainer.metrics import JsonlLogger
from trainer.models import build_model
from trainer.models.contrastive import ContrastiveModel
from trainer.objectives import get_objective
from trainer.optim import build_optimizer
from trainer.provenance import write_provenance
from trainer.schedule import lr_at, plan_steps
from trainer.task import ContrastiveTask

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
class TrainResult:
    model: ContrastiveModel
    steps: int
    last: dict[str, float]  # the last logged metrics, averaged over ranks
    run_dir: Path
    dist: DistInfo


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    dataset = BetonDataset(cfg.data.train)  # before any process group: a bad path fails fast, on every rank
    device = pick_device(cfg.engine.device)
    dist = init_distributed(device)
    objective = get_objective(cfg.model.objective)
    model = parallelize(init_model(cfg).to(dist.device), dist)
    o = cfg.optim
    optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, o.betas, o.eps)
    ds_cfg = deepspeed_config(
        cfg.data.batch_size, dist.world, zero_stage=cfg.engine.zero_stage, precision=cfg.engine.precision, grad_clip=o.grad_clip
    )
    engine = build_engine(model, optimizer, ds_cfg)
    task = ContrastiveTask(objective, cfg.loss, dist.group)
    sampler = EpochSampler(len(dataset), cfg.data.batch_size, seed=cfg.run.seed, rank=dist.rank, world=dist.world)
    plan = plan_steps(cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.steps, sampler.steps_per_epoch)
    loader = ThreeViewLoader(
        dataset,
        sampler,
        objective.views,
        cfg.augment,
        text=objective.text,
        device="gpu" if device == "cuda" else "cpu",
        device_id=dist.local_rank,
        threads=cfg.data.threads,
        prefetch=cfg.data.prefetch,
        source_workers=cfg.data.source_workers,
        seed=cfg.run.seed * 1000 + dist.rank,
    )
    # Everything is built: only now does the run directory get its files.
    run_dir = cfg.run_dir
    if dist.is_main:
        cfg.dump(run_dir / "config.yaml")
        write_provenance(run_dir / "provenance.json", dataset.manifest)
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
        t2 = time.perf_counter()
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == plan.total - 1:
            # Reading values syncs the device, so only on logging steps; averaged over ranks.
            last = reduce_mean({k: v.detach().float() for k, v in losses.items()}, dist)
            samples_per_s = cfg.data.batch_size / (t2 - t0)
            bar.set_postfix(loss=f"{last['loss']:.3f}", samples_s=f"{samples_per_s:.0f}")
            record: dict[str, Any] = {"step": step, "epoch": step / plan.steps_per_epoch, "lr": lr, **last}
            record.update(samples_per_s=samples_per_s, data_ms=1e3 * (t1 - t0), step_ms=1e3 * (t2 - t0))
            record["replaced_samples"] = loader.replaced  # corrupt samples replaced on rank 0 so far
            logger.write(record)
    bar.close()
    logger.close()
    engine.save_checkpoint(
        str(run_dir / "checkpoints"), tag=f"step-{plan.total:08d}", client_state={"step": plan.total, "config": cfg.to_dict()}
    )
    return TrainResult(engine.module, plan.total, last, run_dir, dist)
