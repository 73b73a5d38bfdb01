"""The training loop: build the run, resume it, run it; the loop owns schedule, logging and checkpoints.

Everything a step depends on is either a pure function of the global step (the sample
order, the captions drawn, the learning rate) or saved in the checkpoint (weights, optimizer
state, BatchNorm statistics, DALI's random states, the torch RNG, the counters), so a run
that is killed and resumed computes the same losses as one that was not.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.build import Built, StepParts, build
from trainer.checkpoint import CheckpointManager, Resumed, check_resumable, warn_fallback
from trainer.config import Config
from trainer.dist import DistInfo, agree, reduce_mean
from trainer.engine import linear_restored, set_lr
from trainer.levers import patch_dropout_at, sizes_at
from trainer.models import SlipModel
from trainer.periodic_eval import PeriodicEval
from trainer.runlog import RunLogger, peak_bytes, write_provenance
from trainer.schedule import StepPlan, lr_at, plan_steps


class TrainingStopped(RuntimeError):
    """The run stopped itself (after checkpointing) for the one-line reason in the message."""


@dataclass
class TrainResult:
    model: SlipModel  # the engine's module: under ZeRO-3 its parameters are partitions (use `slip export`)
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


@contextlib.contextmanager
def progress_bar(total: int, initial: int, desc: str, *, quiet: bool) -> Iterator[tqdm]:
    """The run's bar. Warnings logged under `slipstream` while it is drawn (a corrupt sample
    replaced by the loader) are written above it, each on its own line, not glued onto the bar's."""
    with tqdm(total=total, initial=initial, desc=desc, unit="step", disable=quiet) as bar:
        with logging_redirect_tqdm([logging.getLogger("slipstream")]):
            yield bar


class Stages(Protocol):
    """A profiler's timer (`slip profile step`): it marks the parts of the step it cannot wrap."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]: ...


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the engine's device: a no-op for DALI's GPU output, the host-to-device copy otherwise."""
    return {k: v if v.device == device else v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    parts: StepParts, batch: dict[str, torch.Tensor], stop_requested: bool = False, stages: Stages | None = None
) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """Forward, loss, backward and optimizer step on one batch: (losses, non-finite, stop now).

    A non-finite loss on any rank skips the update on every rank (it would poison the weights);
    the batch is consumed, so a bad batch is not retried forever. `stop now` is whether any rank
    was asked to stop: every rank must take the same branch, or collectives hang."""
    engine, grad_cache = parts.engine, parts.grad_cache
    stage = stages.stage if stages is not None else lambda _: contextlib.nullcontext()
    with stage("h2d"):
        batch = to_device(batch, parts.dist.device)
    with stage("loss"):
        losses = grad_cache.loss(engine, batch) if grad_cache else parts.task(engine, batch)
    nonfinite, stop_now = agree([not bool(torch.isfinite(losses["loss"]).all()), stop_requested], parts.dist)
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


def _check_trainable(cfg: Config) -> None:
    if cfg.run.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("config: run.wandb is true but wandb is not installed (pip install wandb)") from None
    if cfg.data.loader == "pil":
        raise ValueError("config: data.loader=pil (the SLIP reference's PIL pipeline) is for `slip profile step` comparisons; train with data.loader=dali")
    if cfg.data.loader == "synthetic" and not cfg.data.allow_synthetic:
        raise ValueError("config: data.loader=synthetic trains on random tensors and learns nothing (it is for `slip profile step`); "
                         "set data.allow_synthetic=true to run it anyway, as a smoke test of a node")  # fmt: skip


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    """Train (or resume) the run `cfg` describes, to its last step or until a signal asks it to stop."""
    _check_trainable(cfg)
    with linear_restored():
        built = build(cfg)
        try:
            checkpoints = CheckpointManager(cfg.run_dir / "checkpoints", rank=built.dist.rank, world=built.dist.world, keep=cfg.run.keep)
            resumed = _resume(cfg, built, checkpoints)
            return _Run(cfg, built, checkpoints, resumed).run(progress)
        finally:
            built.parts.close()


def _resume(cfg: Config, built: Built, checkpoints: CheckpointManager) -> Resumed | None:
    """The latest checkpoint loaded into the engine (and the torch RNG), or None for a fresh run."""
    if not cfg.run.resume:
        if checkpoints.holds_checkpoints():
            raise ValueError(f"config: {cfg.run_dir} already holds checkpoints; set run.resume=true to continue them, "
                             f"give run.name another name to start a new run, or remove {checkpoints.directory} to start this one over")  # fmt: skip
        return None
    resumed = checkpoints.resume(built.parts.engine, check=lambda meta, where: check_resumable(cfg, built.dist.world, meta, where))
    if resumed is not None and resumed.rank_state is not None:
        torch.set_rng_state(resumed.rank_state["torch_rng"])
    if resumed is not None and built.dist.is_main:
        warn_fallback(resumed.damaged, resumed.path)
    return resumed


class _Run:
    """One process's part of a run, from its first step to its last (or to a stop)."""

    def __init__(self, cfg: Config, built: Built, checkpoints: CheckpointManager, resumed: Resumed | None) -> None:
        self.cfg, self.built, self.checkpoints = cfg, built, checkpoints
        self.dist, self.parts = built.dist, built.parts
        self.start = resumed.step if resumed else 0
        self.resumed_path = resumed.path if resumed else None
        self.counters = {"nonfinite_skipped": 0, "nonfinite_in_a_row": 0, **(resumed.meta.get("counters", {}) if resumed else {})}
        rank_state = resumed.rank_state if resumed else None
        self.plan: StepPlan = plan_steps(cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.steps, built.steps_per_epoch)
        self.periodic = PeriodicEval(cfg, self.plan.steps_per_epoch, self.plan.total, self.dist.is_main)
        # Last: from here on `run` owns the loader's threads and closes them however it ends.
        self.loader = built.loader(self.start, rank_state["loader"] if rank_state is not None else None)
        self.loader.replaced = self.counters.get("replaced_samples", 0)
        self.last: dict[str, float] = {}  # the last logged losses and metrics, averaged over ranks
        self.samples_per_s = 0.0

    def run(self, progress: bool) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        step, stopped_by_signal = self.start, False
        self.logger = None
        try:
            # Everything is built: only now does the run directory get its files.
            if dist.is_main:
                cfg.dump(cfg.run_dir / "config.yaml")
                write_provenance(cfg.run_dir / "provenance.json", self.built.dataset.manifest if self.built.dataset else {"source": "synthetic"})
            self.logger = RunLogger(
                cfg.run_dir, enabled=dist.is_main, start_step=self.start, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                wandb_project=cfg.run.wandb_project, config=cfg.to_dict(),
            )  # fmt: skip
            if self.resumed_path is not None and dist.is_main:
                epoch = self.start / self.plan.steps_per_epoch
                print(f"resumed from {self.resumed_path} at step {self.start} of {self.plan.total} (epoch {epoch:.2f})", flush=True)
            quiet = not progress or not dist.is_main or os.environ.get("CI") == "true"
            desc = f"train {cfg.model.objective}-{cfg.model.size}"
            with progress_bar(self.plan.total, self.start, desc, quiet=quiet) as bar, _StopRequests() as stop:
                while step < self.plan.total and not stopped_by_signal:
                    stopped_by_signal = self._step(step, stop.requested)
                    step += 1
                    bar.update(1)
                    if self.last:
                        bar.set_postfix(loss=f"{self.last['loss']:.3f}", samples_s=f"{self.samples_per_s:.0f}")
                    self._checkpoint(step, stopped_by_signal)
        finally:
            if self.logger is not None:
                self.logger.close()
            self.loader.close()  # DALI's threads and source workers, even when the run stops by exception
        return TrainResult(self.parts.engine.module, step, self.last, cfg.run_dir, dist, resumed_from=self.start, stopped_by_signal=stopped_by_signal)

    def _step(self, step: int, stop_requested: bool) -> bool:
        """Run global step `step` and write its metrics record (when anything is due); whether any rank was asked to stop."""
        cfg, dist, plan = self.cfg, self.dist, self.plan
        lr = lr_at(step, total=plan.total, warmup=plan.warmup, peak=self.parts.peak, start=cfg.schedule.start_lr, end=cfg.schedule.end_lr)
        set_lr(self.parts.engine, lr)
        drops = patch_dropout_at(cfg, step, plan.total)
        self.parts.engine.module.set_patch_dropout(*drops)
        t0 = time.perf_counter()
        batch = next(self.loader)
        t1 = time.perf_counter()
        losses, nonfinite, stop_now = train_step(self.parts, batch, stop_requested)
        self.counters["nonfinite_skipped"] += int(nonfinite)
        self.counters["nonfinite_in_a_row"] = self.counters["nonfinite_in_a_row"] + 1 if nonfinite else 0
        record: dict[str, Any] = {"step": step, "epoch": step / plan.steps_per_epoch}
        if step % cfg.run.log_every == 0 or step + 1 == plan.total or nonfinite:
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)  # the step's kernels, not just their launch, in step_ms
            t2 = time.perf_counter()
            # Reading values syncs the device, so only on logging steps; averaged over ranks.
            self.last = reduce_mean({k: v.detach().float() for k, v in losses.items()}, dist)
            self.samples_per_s = cfg.data.batch_size / (t2 - t0)
            record.update(lr=lr, **self.last, samples_per_s=self.samples_per_s, data_ms=1e3 * (t1 - t0), step_ms=1e3 * (t2 - t0))
            record.update(peak_memory_bytes=peak_bytes(dist.device), replaced_samples=self.loader.replaced)
            record.update(nonfinite_skipped=self.counters["nonfinite_skipped"])
            image_px, ssl_px = sizes_at(cfg, step, plan.steps_per_epoch)
            record.update(image_px=image_px, ssl_px=ssl_px, patch_dropout=drops[0], ssl_patch_dropout=drops[1])
        if self.periodic.due(step + 1):
            record.update(self.periodic.run(self.parts.engine, dist.world))
        if len(record) > 2:  # more than its step and epoch
            self.logger.write(record)
        if self.counters["nonfinite_in_a_row"] >= cfg.run.max_nonfinite:
            self._save(step + 1)
            raise TrainingStopped(
                f"{self.counters['nonfinite_in_a_row']} non-finite losses in a row at step {step}; "
                f"checkpoint {cfg.run_dir / 'checkpoints'} holds the last finite weights: run again with a lower optim.lr to resume from it"
            )
        return stop_now

    def _checkpoint(self, step: int, stop_now: bool) -> None:
        """Save after `step` steps when one is due: every `run.checkpoint_every`, at the end, and before a stop."""
        every = self.cfg.run.checkpoint_every
        if stop_now or step == self.plan.total or (every and step % every == 0):
            self._save(step)

    def _save(self, step: int) -> None:
        self.counters["replaced_samples"] = self.loader.replaced
        rank = {"loader": self.loader.state(), "torch_rng": torch.get_rng_state()}
        meta = {"config": self.cfg.to_dict(), "counters": dict(self.counters)}
        self.checkpoints.save(self.parts.engine, step, meta, rank, self.cfg.to_dict())
