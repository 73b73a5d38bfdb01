"""The training loop: builds the parts from the config, owns schedule, logging, checkpoints and resume.

Everything a step depends on is either a pure function of the global step (the sample
order, the captions drawn, the learning rate) or saved in the checkpoint (weights, optimizer
state, BatchNorm statistics, DALI's random states, the torch RNG, the counters), so a run
that is killed and resumed computes the same losses as one that was not.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler
from trainer.checkpoint import CheckpointManager
from trainer.config import Config, peak_lr
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
from trainer.metrics import RunLogger, peak_memory_bytes
from trainer.models.contrastive import ContrastiveModel
from trainer.models.from_config import model_from_config
from trainer.objectives import get_objective
from trainer.optim import build_optimizer
from trainer.periodic_eval import PeriodicEval
from trainer.provenance import write_provenance
from trainer.schedule import lr_at, plan_steps
from trainer.stage_timer import StageTimer
from trainer.task import ContrastiveTask


class TrainingStopped(RuntimeError):
    """The run stopped itself (after checkpointing) for the one-line reason in the message."""


def init_model(cfg: Config) -> ContrastiveModel:
    """The model at step 0; seeded, so every caller (trainer, demo baseline) gets the same weights."""
    torch.manual_seed(cfg.run.seed)
    return model_from_config(cfg)


@dataclass
class TrainResult:
    model: ContrastiveModel  # the engine's module: under ZeRO-3 its parameters are partitions (use `slip export`)
    steps: int  # the global step the run ended at
    last: dict[str, float]  # the last logged metrics, averaged over ranks
    run_dir: Path
    dist: DistInfo
    resumed_from: int = 0  # the step this process started at (0: a fresh run)
    stopped_by_signal: bool = False


class _StopRequests:
    """SIGTERM / SIGINT ask the loop to finish its step, checkpoint and leave.

    A second SIGINT interrupts at once (an impatient Ctrl-C); repeated SIGTERMs do not, because
    under the deepspeed launcher a Ctrl-C reaches a rank twice (the terminal's SIGINT, then the
    launcher's SIGTERM) and the launcher's SIGKILL 30 s later is the backstop anyway."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agree(flags: list[bool], dist: DistInfo) -> list[bool]:
    """Whether any rank raised each flag: every rank must take the same branch, or collectives hang."""
    if dist.world == 1:
        return flags
    import torch.distributed as tdist

    t = torch.tensor([float(f) for f in flags], device=dist.device)  # (n_flags,)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _check_resumable(cfg: Config, world: int, meta: dict[str, Any], where: Path) -> None:
    """A resume under a different model, batch or optimizer-state layout would not be the same
    run (or would fail deep inside DeepSpeed): say so in one line, before loading anything."""
    saved, now = meta.get("config", {}), cfg.to_dict()
    # data.device: the DALI graph (and its saved random state) differs between CPU and GPU decoding.
    for section, key in (("model", None), ("data", "batch_size"), ("data", "device"), ("engine", "zero_stage"), ("optim", "name")):
        # A key the checkpoint predates had its default then.
        a = saved.get(section, {}) if key is None else saved.get(section, {}).get(key, Config().to_dict()[section][key])
        b = now[section] if key is None else now[section][key]
        if a != b:
            name = section if key is None else f"{section}.{key}"
            raise ValueError(f"config: {name} differs from the checkpoint in {where}; use another run.name or run.resume=false")
    if cfg.engine.zero_stage > 0 and meta.get("world") != world:
        raise ValueError(
            f"{where}: written by {meta.get('world')} ranks, resumed on {world}; "
            "ZeRO stage > 0 partitions the optimizer state by rank, so only stage 0 can change the number of ranks"
        )


@dataclass
class StepParts:
    """What one training step runs: the engine, the task, GradCache when micro-batching."""

    engine: Any  # DeepSpeed's engine around the (parallelised) model
    task: ContrastiveTask
    grad_cache: Any  # a GradCache, or None
    dist: DistInfo
    peak: float  # the peak learning rate, scaled for the batch

    def close(self) -> None:
        # The optimizer's state and ZeRO's buffers go now, not whenever a cycle collector finds
        # them: several runs in one process (tests, sweeps, profiles) would otherwise pile them up.
        self.engine.destroy()
        self.engine.optimizer = None


def build_step(cfg: Config, dist: DistInfo, device: str) -> StepParts:
    """The model at step 0 inside its DeepSpeed engine, and the task that computes its losses."""
    objective = get_objective(cfg.model.objective)
    model = init_model(cfg)
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
    task = ContrastiveTask(objective, cfg.loss, dist.group)
    grad_cache = None
    if cfg.engine.micro_batches > 1:
        from trainer.gradcache import GradCache

        grad_cache = GradCache(task, cfg.engine.micro_batches)
    return StepParts(engine, task, grad_cache, dist, peak)


def loader_device(cfg: Config, device: str) -> str:
    """Where DALI decodes: `data.device`, or the GPU when training on one."""
    if cfg.data.device == "gpu" and device != "cuda":
        raise ValueError("config: data.device=gpu needs a CUDA device to train on")
    if cfg.data.device == "auto":
        return "gpu" if device == "cuda" else "cpu"
    return cfg.data.device


def build_loader(
    cfg: Config, dataset: BetonDataset, sampler: EpochSampler, dist: DistInfo, device: str, start: int = 0, state: dict | None = None
) -> Any:
    """An iterator of batches in the batch contract, from global step `start`, on DALI's output device."""
    objective = get_objective(cfg.model.objective)
    if cfg.data.loader == "reference":
        from pipeline.baseline import reference_batches

        return reference_batches(dataset, objective.views, cfg.augment, sampler, workers=cfg.data.threads, start_step=start)
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
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the engine's device: a no-op for DALI's GPU output, the host-to-device copy otherwise."""
    return {k: v if v.device == device else v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    parts: StepParts, batch: dict[str, torch.Tensor], stop_requested: bool = False, stages: StageTimer | None = None
) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """Forward, loss, backward and optimizer step on one batch: (losses, non-finite, stop now).

    A non-finite loss on any rank skips the update on every rank (it would poison the weights);
    the batch is consumed, so a bad batch is not retried forever. `stop now` is whether any rank
    was asked to stop: every rank must take the same branch, or collectives hang. `stages`: the
    profiler's timer (`slip profile step`), which marks the parts of the step it cannot wrap."""
    engine, grad_cache = parts.engine, parts.grad_cache
    stage = stages.stage if stages is not None else lambda _: contextlib.nullcontext()
    with stage("h2d"):
        batch = to_device(batch, parts.dist.device)
    with stage("loss"):
        losses = grad_cache.loss(engine, batch) if grad_cache else parts.task(engine, batch)
    nonfinite, stop_now = _agree([not bool(torch.isfinite(losses["loss"]).all()), stop_requested], parts.dist)
    if nonfinite:
        if grad_cache:
            grad_cache.discard()
    elif grad_cache:
        with stage("backward"):  # each chunk's tower forward, backward and step mark their own stages
            grad_cache.backward_and_step(engine)
    else:
        engine.backward(losses["loss"])
        engine.step()
    return losses, nonfinite, stop_now


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    dataset = BetonDataset(cfg.data.train)  # before any process group: a bad path fails fast, on every rank
    device = pick_device(cfg.engine.device)
    if cfg.run.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("config: run.wandb is true but wandb is not installed (pip install wandb)") from None
    if cfg.data.loader != "dali":
        raise ValueError("config: data.loader=reference (the SLIP reference's PIL pipeline) is for `slip profile step` comparisons; train with data.loader=dali")
    loader_device(cfg, device)  # a bad data.device fails before any process group
    dist = init_distributed(device)
    # ZeRO-3 swaps torch.nn.functional.linear for its own (memory-saving, numerically not
    # bitwise the same) for the rest of the process; it is put back when the run ends, so a
    # later run in this process computes as a fresh process does.
    linear = torch.nn.functional.linear
    parts = build_step(cfg, dist, device)
    engine, peak = parts.engine, parts.peak
    checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", rank=dist.rank, world=dist.world, keep=cfg.run.keep)
    checkpoints.attach(engine)
    resumed = None
    if cfg.run.resume:
        resumed = checkpoints.resume(engine, check=lambda meta, where: _check_resumable(cfg, dist.world, meta, where))
    elif (cfg.run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"config: {cfg.run_dir} already holds checkpoints; set run.resume=true or use another run.name")
    start = resumed.step if resumed else 0
    counters = {"nonfinite_skipped": 0, "nonfinite_in_a_row": 0, **(resumed.meta.get("counters", {}) if resumed else {})}
    rank_state = resumed.rank_state if resumed else None
    if rank_state is not None:
        torch.set_rng_state(rank_state["torch_rng"])

    sampler = EpochSampler(len(dataset), cfg.data.batch_size, seed=cfg.run.seed, rank=dist.rank, world=dist.world)
    plan = plan_steps(cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.steps, sampler.steps_per_epoch)
    loader = build_loader(cfg, dataset, sampler, dist, device, start, rank_state["loader"] if rank_state is not None else None)
    loader.replaced = counters.get("replaced_samples", 0)
    periodic = PeriodicEval(cfg, plan.steps_per_epoch, plan.total, dist.is_main)
    # Everything is built: only now does the run directory get its files.
    run_dir = cfg.run_dir
    if dist.is_main:
        cfg.dump(run_dir / "config.yaml")
        write_provenance(run_dir / "provenance.json", dataset.manifest)
    logger = RunLogger(
        run_dir, enabled=dist.is_main, start_step=start, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
        wandb_project=cfg.run.wandb_project, config=cfg.to_dict(),
    )  # fmt: skip
    quiet = not progress or not dist.is_main or os.environ.get("CI") == "true"
    bar = tqdm(total=plan.total, initial=start, desc=f"train {cfg.model.objective}-{cfg.model.size}", unit="step", disable=quiet)

    def save(step: int) -> None:
        counters["replaced_samples"] = loader.replaced
        rank = {"loader": loader.state(), "torch_rng": torch.get_rng_state()}
        meta = {"config": cfg.to_dict(), "counters": dict(counters)}
        checkpoints.save(engine, step, meta, rank, cfg.to_dict())

    last: dict[str, float] = {}
    step = start
    stopped_by_signal = False
    try:
        with _StopRequests() as stop:
            while step < plan.total:
                lr = lr_at(step, total=plan.total, warmup=plan.warmup, peak=peak, start=cfg.schedule.start_lr, end=cfg.schedule.end_lr)
                set_lr(engine, lr)
                t0 = time.perf_counter()
                batch = next(loader)
                t1 = time.perf_counter()
                losses, nonfinite, stop_now = train_step(parts, batch, stop.requested)
                if nonfinite:
                    counters["nonfinite_skipped"] += 1
                    counters["nonfinite_in_a_row"] += 1
                else:
                    counters["nonfinite_in_a_row"] = 0
                log_now = step % cfg.run.log_every == 0 or step + 1 == plan.total or nonfinite
                if log_now and dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)  # the step's kernels, not just their launch, in step_ms
                t2 = time.perf_counter()
                step += 1
                bar.update(1)
                if log_now:
                    # Reading values syncs the device, so only on logging steps; averaged over ranks.
                    last = reduce_mean({k: v.detach().float() for k, v in losses.items()}, dist)
                    samples_per_s = cfg.data.batch_size / (t2 - t0)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", samples_s=f"{samples_per_s:.0f}")
                    record: dict[str, Any] = {"step": step - 1, "epoch": (step - 1) / plan.steps_per_epoch, "lr": lr, **last}
                    record.update(samples_per_s=samples_per_s, data_ms=1e3 * (t1 - t0), step_ms=1e3 * (t2 - t0))
                    record.update(peak_memory_bytes=peak_memory_bytes(dist.device), replaced_samples=loader.replaced)
                    record.update(nonfinite_skipped=counters["nonfinite_skipped"])
                    if periodic.due(step):
                        record.update(periodic.run(engine, dist.world))
                    logger.write(record)
                elif periodic.due(step):
                    logger.write({"step": step - 1, "epoch": (step - 1) / plan.steps_per_epoch, **periodic.run(engine, dist.world)})
                if counters["nonfinite_in_a_row"] >= cfg.run.max_nonfinite:
                    save(step)
                    raise TrainingStopped(
                        f"{counters['nonfinite_in_a_row']} non-finite losses in a row at step {step - 1}; "
                        f"checkpoint {run_dir / 'checkpoints'} holds the last finite weights"
                    )
                every = cfg.run.checkpoint_every
                if stop_now or step == plan.total or (every and step % every == 0):
                    save(step)
                if stop_now:
                    stopped_by_signal = True
                    break
    finally:
        bar.close()
        logger.close()
        loader.close()  # DALI's threads and source workers, even when the run stops by exception
        parts.close()
        torch.nn.functional.linear = linear
    return TrainResult(engine.module, step, last, run_dir, dist, resumed_from=start, stopped_by_signal=stopped_by_signal)

