"""Everything a training step needs, built from the config in one place: the model, the engine
around it, the task that computes its losses, and the loader that feeds it. Training
(`trainer.loop`) and the profiler (`slip profile step`) build through here, so the step that
is measured is the step that trains.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler
from pipeline.synthetic import SyntheticBatches
from trainer.config import Config
from trainer.dist import DistInfo, pick_device
from trainer.engine import build_engine, deepspeed_config, init_distributed, parallelize
from trainer.gradcache import GradCache
from trainer.launch import launched, local_batch
from trainer.levers import check_levers, patch_dropout_at, sizes_at, varying_sizes
from trainer.models import SlipModel, build_model
from trainer.objectives import get_objective
from trainer.optim import build_optimizer, peak_lr
from trainer.task import TrainingTask


def model_from_config(cfg: Config) -> SlipModel:
    """The architecture of `cfg.model` for `cfg.augment.image_size`, initialised from torch's RNG as it is."""
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
        dynamic_img_size=varying_sizes(cfg),
    )


def init_model(cfg: Config) -> SlipModel:
    """The model at step 0; seeded, so every caller (trainer, demo baseline) gets the same weights."""
    torch.manual_seed(cfg.run.seed)
    return model_from_config(cfg)


def loader_device(cfg: Config, device: str) -> str:
    """Where DALI decodes: `data.device`, or the GPU when training on one."""
    if cfg.data.device == "gpu" and device != "cuda":
        raise ValueError("config: data.device=gpu needs a CUDA device to train on")
    if cfg.data.device == "auto":
        return "gpu" if device == "cuda" else "cpu"
    return cfg.data.device


@dataclass
class StepParts:
    """What one training step runs: the engine, the task, GradCache when micro-batching."""

    engine: Any  # DeepSpeed's engine around the (parallelised) model
    task: TrainingTask
    grad_cache: GradCache | None
    dist: DistInfo
    peak: float  # the peak learning rate, scaled for the batch

    def close(self) -> None:
        # The optimizer's state and ZeRO's buffers go now, not whenever a cycle collector finds
        # them: several runs in one process (tests, sweeps, profiles) would otherwise pile them up.
        self.engine.destroy()
        self.engine.optimizer = None


def build_step(cfg: Config, dist: DistInfo, device: str) -> StepParts:
    """The model at step 0 inside its DeepSpeed engine, and the task that computes its losses."""
    model = init_model(cfg)
    model.set_patch_dropout(*patch_dropout_at(cfg, 0, total=1 << 62))  # the training loop sets each step's
    # The weights are the same on every rank; from here each rank draws its own patch dropout masks.
    torch.manual_seed(cfg.run.seed * 1000 + dist.rank)
    if cfg.engine.activation_checkpointing:
        model.set_grad_checkpointing(True)
    model = parallelize(model.to(dist.device), dist)
    o = cfg.optim
    peak = peak_lr(o, cfg.data.batch_size)
    optimizer = build_optimizer(model, o.name, peak, o.weight_decay, o.betas, o.eps, device=device)
    ds_cfg = deepspeed_config(
        cfg.data.batch_size, dist.world, zero_stage=cfg.engine.zero_stage, precision=cfg.engine.precision,
        grad_clip=o.grad_clip, micro_batches=cfg.engine.micro_batches, device=device,
    )  # fmt: skip
    engine = build_engine(model, optimizer, ds_cfg)
    task = TrainingTask(get_objective(cfg.model.objective), cfg.loss, dist.group)
    grad_cache = GradCache(task, cfg.engine.micro_batches) if cfg.engine.micro_batches > 1 else None
    return StepParts(engine, task, grad_cache, dist, peak)


def build_loader(
    cfg: Config, dataset: BetonDataset, sampler: EpochSampler, dist: DistInfo, device: str, start: int = 0, state: dict | None = None
) -> Any:
    """DALI's batches in the batch contract (a ThreeViewLoader), from global step `start`, on DALI's output device."""
    # DALI is imported here: a node with the offline bundle's first tier only has none, and
    # trains and profiles on the synthetic loader.
    from pipeline.loader import ThreeViewLoader

    objective = get_objective(cfg.model.objective)
    return ThreeViewLoader(
        dataset,
        sampler,
        objective.views,
        cfg.augment,
        text=objective.text,
        device=loader_device(cfg, device),
        device_id=dist.local_rank,
        threads=cfg.data.threads,
        prefetch=cfg.data.prefetch,
        source_workers=cfg.data.source_workers,
        seed=cfg.run.seed * 1000 + dist.rank,
        start_step=start,
        state=state,
        half=cfg.engine.precision == "bf16",  # fp16 views from a GPU graph: half DALI's bytes, as good under autocast
        hw_decoder_load=None if cfg.data.hw_decoder_load < 0 else cfg.data.hw_decoder_load,
        sizes=functools.partial(sizes_at, cfg, steps_per_epoch=sampler.steps_per_epoch),
    )


def synthetic_loader(cfg: Config, dist: DistInfo, start: int = 0, steps_per_epoch: int = 1) -> SyntheticBatches:
    """Random batches in the batch contract on the training device: the step without its data."""
    objective, m = get_objective(cfg.model.objective), cfg.model
    return SyntheticBatches(
        objective.views, batch_size=cfg.data.batch_size // dist.world, image_size=cfg.augment.image_size, text=objective.text,
        context_length=m.context_length, vocab_size=m.vocab_size, device=dist.device, seed=cfg.run.seed * 1000 + dist.rank, start_step=start,
        rank=dist.rank, ssl_image_size=cfg.augment.ssl_image_size, sizes=functools.partial(sizes_at, cfg, steps_per_epoch=steps_per_epoch),
    )  # fmt: skip


@dataclass
class Built:
    """A run's data and step, before any batch is read: what training and the profiler share.
    With the synthetic loader there is no dataset and no sampler."""

    cfg: Config
    dataset: BetonDataset | None
    device: str  # "cpu" or "cuda": where the model trains
    parts: StepParts
    sampler: EpochSampler | None

    @property
    def dist(self) -> DistInfo:
        return self.parts.dist

    @property
    def steps_per_epoch(self) -> int:
        if self.sampler is not None:
            return self.sampler.steps_per_epoch
        # Synthetic data has no epochs: schedule.steps spread over schedule.epochs, so the warm-up
        # keeps its share of the run.
        s = self.cfg.schedule
        return max(1, round(s.steps / s.epochs)) if s.steps else 1

    def loader(self, start: int = 0, state: dict | None = None) -> Any:
        if self.dataset is None or self.sampler is None:
            return synthetic_loader(self.cfg, self.dist, start, self.steps_per_epoch)
        return build_loader(self.cfg, self.dataset, self.sampler, self.dist, self.device, start, state)


def build(cfg: Config, make_step: Callable[[Config, DistInfo, str], StepParts] = build_step) -> Built:
    """The dataset, the process group and the step of `cfg` (by `make_step`: a profiler's baseline
    may build another). What can be wrong with the config or the data fails first, on every rank
    and before any process group exists: the launch's rank and world come from the environment."""
    check_levers(cfg)
    synthetic = cfg.data.loader == "synthetic"
    dataset = None if synthetic else BetonDataset(cfg.data.train)
    device = pick_device(cfg.engine.device)
    if cfg.data.loader == "dali":
        loader_device(cfg, device)
    launch = launched()
    local_batch(cfg.data.batch_size, launch.world, cfg.engine.micro_batches)
    sampler = None
    if dataset is not None:
        sampler = EpochSampler(len(dataset), cfg.data.batch_size, seed=cfg.run.seed, rank=launch.rank, world=launch.world)
    dist = init_distributed(device)
    if (dist.rank, dist.world) != (launch.rank, launch.world):
        raise RuntimeError(f"the process group made this rank {dist.rank} of {dist.world}; RANK and WORLD_SIZE said {launch.rank} of {launch.world}")
    return Built(cfg, dataset, device, make_step(cfg, dist, device), sampler)
