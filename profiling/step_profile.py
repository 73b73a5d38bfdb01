"""`slip profile step`: the real training step, timed stage by stage, side by side over configs.

Each configuration builds the trainer's own parts (`trainer.build.build`) and runs
`trainer.loop.train_step`, the function the training loop runs, with a `StageTimer` marking it
from outside. Warm-up steps run first and are not reported. Nothing synchronises the device
between measured steps (training does not either); the stage clocks are read after the last
one. The measured steps' wall-clock time is read apart from the stages, so that the two can be
compared: they agree within the clocks' overhead.

After the measured steps the loader runs alone for a few batches: its per-batch cost (read,
and decode + augment) is what the prefetching hides behind the step; `data_wait` is the part
it could not hide. Configurations of one comparison run one after another in fresh processes
(their peak memory is their own) on the same samples: the sampler is a pure function of the
seed and the step, which every configuration shares unless an override changes it.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue as queues
import statistics
import time
import traceback
from typing import Any

import numpy as np
import torch

from pipeline.command import one_line
from pipeline.reader import BetonDataset
from profiling.flops import device_peak_flops, measured_peak_flops, mfu, step_flops, step_matmul_shapes
from profiling.pil_pipeline import pil_batches
from profiling.plain_step import PLAIN_NAME, plain_step
from profiling.stage_timer import STAGES, StageTimer, instrument
from trainer.build import Built, build, build_step, loader_device
from trainer.config import Config, load_config, require_train_data
from trainer.dist import pick_device
from trainer.engine import linear_restored, set_lr
from trainer.loop import train_step
from trainer.objectives import get_objective
from trainer.runlog import peak_bytes, reset_peak

PROFILE_DATA_HINT = " (or pass --data)"


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _loader_alone(loader: Any, dataset: Any, sampler: Any, start: int, batches: int) -> dict[str, float]:
    """The loader with nothing else running, per batch: its time with all its threads
    (throughput), and of that the reading of the batch's JPEG bytes (copied out of the memory
    map, one thread, on steps it has not read yet). With the bytes read in the trainer's thread
    (data.source_workers=0) the two are serial, and the rest is decode + augment."""
    # Batches already waiting cost nothing: DALI's prefetch queue, or a torch DataLoader's
    # prefetch_factor batches per worker (private attributes of its iterator; 0 if they move).
    skip = getattr(loader, "prefetch", None)
    if skip is None:
        skip = getattr(loader, "_num_workers", 0) * getattr(loader, "_prefetch_factor", 0)
    for _ in range(skip):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    per_batch = 1e3 * (time.perf_counter() - t0) / batches
    if dataset is None:  # the synthetic loader reads nothing
        return {"read_ms": 0.0, "decode_augment_ms": 0.0, "batch_ms": per_batch}
    ahead = start + skip + batches + 8  # past anything prefetched
    t0 = time.perf_counter()
    for step in range(ahead, ahead + batches):
        for i in sampler.indices(step):
            np.array(dataset.jpeg(int(i)))  # a copy: the bytes really leave the file
    read = 1e3 * (time.perf_counter() - t0) / batches
    return {"read_ms": read, "decode_augment_ms": max(per_batch - read, 0.0), "batch_ms": per_batch}


def device_peak(cfg: Config) -> tuple[float, str]:
    """(peak FLOP/s of one device at the recipe's precision, where the figure comes from): the
    datasheet's for a known GPU, else the best matmul measured here over the step's own shapes
    and a few squares, in the step's dtype and in fp32. Measured once per comparison, so that
    every configuration's MFU is against the same peak."""
    device = torch.device(pick_device(cfg.engine.device))
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    known = device_peak_flops(device, dtype)
    if known is not None:
        return known
    shapes = step_matmul_shapes(cfg, rows_cap=16384 if device.type == "cuda" else 256)
    dtypes = (dtype, torch.float32)
    peak, timed = measured_peak_flops(device, dtypes, shapes)
    names = " and ".join(str(d)[6:] for d in dict.fromkeys(dtypes))
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return peak, f"best of {timed} matmuls measured on this {device.type}: {names}, the step's shapes among them{threads}"


def _flops(cfg: Config, step_ms: float, world: int, peak: tuple[float, str]) -> dict[str, Any]:
    count = step_flops(cfg, cfg.data.batch_size)
    per_device = count.train_flops / world / (step_ms / 1e3)  # FLOP/s each device achieved
    peak, source = peak
    utilisation = mfu(per_device, peak)
    out = {
        "train_flops_per_step": count.train_flops,
        "achieved_flops_per_device": per_device,
        "peak_flops": peak,
        "peak_source": source,
        "mfu": utilisation,  # None: the step beat the peak, so there is no trustworthy one
    }
    if utilisation is None:
        out["mfu_note"] = (f"n/a (the peak of {peak / 1e12:.3g} TFLOP/s, {source}, is below the step's achieved "
                           f"{per_device / 1e12:.3g} TFLOP/s: no trustworthy peak)")  # fmt: skip
    return out


def _loader(built: Built) -> Any:
    """The configuration's loader: the trainer's own (DALI), or the SLIP reference's PIL pipeline over the same samples."""
    cfg = built.cfg
    if cfg.data.loader == "pil":
        views = get_objective(cfg.model.objective).views
        return pil_batches(built.dataset, views, cfg.augment, built.sampler, workers=cfg.data.threads)
    return built.loader()


def profile_step(
    cfg: Config, *, warmup: int = 3, steps: int = 10, loader_batches: int = 3, peak: tuple[float, str] | None = None, plain: bool = False
) -> dict[str, Any]:
    """Stage times of `steps` training steps after `warmup` ones, on this process's rank.
    `peak`: the device's (FLOP/s, source) for MFU; measured here when not given. `plain`: the
    step of the plain torch baseline (`profiling.plain_step`) instead of slipstream's."""
    require_train_data(cfg, PROFILE_DATA_HINT)
    if warmup < 0 or steps < 1:
        raise ValueError(f"--warmup must be >= 0 and --steps >= 1, got {warmup} and {steps}")
    with linear_restored():
        built = build(cfg, plain_step if plain else build_step)
        loader = None
        try:
            loader = _loader(built)
            dist, parts = built.dist, built.parts
            set_lr(parts.engine, parts.peak)
            timer = StageTimer(dist.device)
            indices = []
            with instrument(timer, parts.engine):
                for _ in range(warmup):
                    train_step(parts, next(loader))
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                reset_peak(dist.device)  # the peak of the measured steps, not of start-up
                started = time.perf_counter()
                for _ in range(steps):  # as in training: no synchronisation between steps
                    timer.begin_step()
                    with timer.stage("data_wait"):
                        batch = next(loader)
                    indices.append(batch["index"])  # read after the last step: a copy now would synchronise
                    train_step(parts, batch, stages=timer)
                rows = timer.finish()
                wall = 1e3 * (time.perf_counter() - started) / steps
            memory = peak_bytes(dist.device)
            alone = _loader_alone(loader, built.dataset, built.sampler, warmup + steps, loader_batches)
        finally:
            close = getattr(loader, "close", None)  # the PIL pipeline's DataLoader has none
            if close is not None:
                close()
            built.parts.close()
    digest = hashlib.sha256(b"".join(i.cpu().numpy().astype(np.int64).tobytes() for i in indices))
    overlapped = [r.pop("overlapped_comm_ms") for r in rows]
    stages = _median(rows)
    step_ms = statistics.median(sum(r.values()) for r in rows)
    return {
        "device": str(dist.device),
        "world": dist.world,
        "batch_size": cfg.data.batch_size,
        "loader": f"dali-{loader_device(cfg, built.device)}" if cfg.data.loader == "dali" else cfg.data.loader,
        "warmup": warmup,
        "steps": steps,
        "stages_ms": stages,
        "step_ms": step_ms,  # the median step: the sum of its stages
        "wall_ms": wall,  # the measured steps' wall-clock time over their number, read apart from the stages
        "overlapped_comm_ms": statistics.median(overlapped),
        "per_step": rows,
        "samples_per_s": cfg.data.batch_size / (step_ms / 1e3),
        "data_stall": stages["data_wait"] / step_ms,
        "peak_memory_bytes": memory,
        "loader_alone": alone,
        "samples_digest": digest.hexdigest()[:16],  # the same in every config that read the same samples
        **_flops(cfg, step_ms, dist.world, peak or device_peak(cfg)),
    }


def _failure(err: Exception) -> dict[str, str]:
    name, line = type(err).__name__, one_line(err)  # an OS error as `<path>: <what failed>`
    out = {"error": name if line == name else f"{name}: {line}"}
    if os.environ.get("SLIP_DEBUG"):
        out["traceback"] = traceback.format_exc()
    return out


# What a launcher (or an earlier in-process run) put in the environment: a fresh child makes a
# process group of its own, on a port of its own, instead of one its parent may still hold.
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child(recipe: str, overrides: list[str], warmup: int, steps: int, peak: tuple[float, str], plain: bool, queue: Any) -> None:
    for name in _LAUNCH_ENV:
        os.environ.pop(name, None)
    try:
        queue.put(profile_step(load_config(recipe, overrides), warmup=warmup, steps=steps, peak=peak, plain=plain))
    except Exception as err:  # reported by the parent as this configuration's failure
        queue.put(_failure(err))


def _result(proc: Any, queue: Any) -> dict[str, Any]:
    """The child's report, read before joining it: a child whose report is still in the queue's
    pipe cannot exit, so join-then-read could wait forever."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            if not proc.is_alive():
                try:
                    return queue.get(timeout=1.0)
                except queues.Empty:
                    return {"error": f"exited with code {proc.exitcode}"}


def compare_steps(
    recipe: str, overrides: list[str], variants: list[list[str]], *, warmup: int = 3, steps: int = 10, fresh_processes: bool = True,
    plain_baseline: bool = False,
) -> dict[str, Any]:
    """profile_step per variant (the recipe + `overrides` + the variant's overrides), in order,
    each in a fresh process unless `fresh_processes` is False (under a multi-rank launcher, where
    every rank must run the same configurations in the same order); ratios against the first.
    `plain_baseline`: last, the recipe + `overrides` as the plain torch baseline."""
    variants = variants or [[]]
    runs = [(" ".join(v) or "base", v, False) for v in variants] + ([(PLAIN_NAME, [], True)] if plain_baseline else [])
    configs = [load_config(recipe, [*overrides, *v]) for _, v, _ in runs]
    for cfg in configs:  # a bad key or dataset fails here, in one line, before minutes of profiling
        require_train_data(cfg, PROFILE_DATA_HINT)
        if cfg.data.loader != "synthetic":
            BetonDataset(cfg.data.train)
    peaks: dict[tuple[str, str], tuple[float, str]] = {}  # measured once per device and precision: comparable MFUs
    for cfg in configs:
        key = (cfg.engine.device, cfg.engine.precision)
        if key not in peaks:
            peaks[key] = device_peak(cfg)
    results = []
    for (name, v, plain), cfg in zip(runs, configs):
        peak = peaks[(cfg.engine.device, cfg.engine.precision)]
        if fresh_processes:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(recipe, [*overrides, *v], warmup, steps, peak, plain, queue))
            proc.start()
            r = _result(proc, queue)
            proc.join()
        else:
            try:
                r = profile_step(cfg, warmup=warmup, steps=steps, peak=peak, plain=plain)
            except Exception as err:
                r = _failure(err)
        results.append({"name": name, "overrides": v, **r})
    first = results[0]
    for r in results[1:]:
        if "error" not in r and "error" not in first:
            r["step_ratio"] = r["step_ms"] / first["step_ms"]
            r["throughput_ratio"] = r["samples_per_s"] / first["samples_per_s"]
    return {"recipe": recipe, "overrides": overrides, "stages": list(STAGES), "configs": results}
