"""Checkpoints that are either complete or invisible, and the resume that reads them.

A checkpoint is the directory `checkpoints/step-NNNNNNNN/`. Every rank writes into
`step-NNNNNNNN.partial/` (DeepSpeed's model and optimizer states, and this rank's loader and
RNG state); after a barrier rank 0 adds `model.safetensors` (the full fp32 model, for `slip
export`) and `meta.json`, renames the directory to its final name, and only then moves the
`latest` pointer (itself replaced atomically). A process killed at any moment therefore
leaves either the previous checkpoint as `latest` or the new one complete; a `.partial`
directory is garbage that the next save removes. The last `keep` checkpoints are kept.

DeepSpeed's files load with `weights_only=True` (the engine's checkpoint engine is replaced
when it is built: `trainer.engine.build_engine`), so a checkpoint cannot run code.
slipstream's own per-rank state is tensors, ints and bytes, which that allows.

`slip export` copies the latest checkpoint's weights out of a run (`export_run`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.atomic import write_json_atomic, write_text_atomic
from trainer.config import Config, config_from_dict
from trainer.dist import all_ranks, barrier, broadcast
from trainer.engine import gathered_module
from trainer.weights import read_weights, write_weights

PREFIX = "step-"
PARTIAL = ".partial"
DELETING = ".deleting"


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _complete(directory: Path) -> bool:
    return directory.is_dir() and (directory / "meta.json").is_file()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint directory under `checkpoints`, or None when there is none.

    `latest` names it; a pointer to a directory that is gone or incomplete (edited by hand,
    or a copy that lost files) is a one-line error rather than a silent restart from step 0."""
    pointer = Path(checkpoints) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    directory = pointer.parent / tag
    if not tag.startswith(PREFIX) or not _complete(directory):
        raise ValueError(f"{pointer}: points to '{tag}', which is not a complete checkpoint")
    return directory


@dataclass(frozen=True)
class Resumed:
    step: int  # the next global step to run
    meta: dict[str, Any]  # meta.json: counters and the config the checkpoint was written with
    rank_state: dict[str, Any] | None  # this rank's loader and RNG state; None if the world size changed


class CheckpointManager:
    def __init__(self, directory: Path, *, rank: int, world: int, keep: int) -> None:
        self.directory, self.rank, self.world, self.keep = Path(directory), rank, world, keep

    @property
    def latest_pointer(self) -> Path:
        return self.directory / "latest"

    def save(self, engine: Any, step: int, meta: dict[str, Any], rank_state: dict[str, Any], weights_config: dict[str, Any]) -> Path:
        """Checkpoint after `step` steps (the next step to run is `step`). Collective: every rank calls it."""
        tag = tag_of(step)
        partial = self.directory / f"{tag}{PARTIAL}"
        final = self.directory / tag
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a save killed earlier
            partial.mkdir(parents=True)
        barrier(self.world)
        self._require_shared(partial.is_dir(), partial)
        engine.save_checkpoint(str(self.directory), tag=partial.name, save_latest=False)
        rank_file = partial / f"rank-{self.rank:05d}.pt"
        torch.save(rank_state, rank_file)
        state = _full_state_dict(engine, wanted=self.rank == 0)  # collective under ZeRO-3
        # On disk before anything can call the checkpoint complete: a node that loses power
        # after the rename must not leave `latest` naming truncated files.
        for f in partial.iterdir():
            if f.is_file() and (self.rank == 0 or f == rank_file or f"rank_{self.rank}_" in f.name):
                _fsync_file(f)
        barrier(self.world)
        if self.rank == 0:
            write_weights(state, partial / "model.safetensors", weights_config)
            write_json_atomic(partial / "meta.json", {**meta, "step": step, "world": self.world})
            _fsync_dir(partial)
            if final.exists():  # the same step saved by an earlier attempt of this run
                shutil.rmtree(final)
            partial.rename(final)
            _fsync_dir(self.directory)
            write_text_atomic(self.directory / "latest", tag)
            self._prune(final)
        barrier(self.world)
        return final

    def _require_shared(self, ok: bool, path: Path) -> None:
        """Every rank must see what rank 0 made; otherwise a node would resume from nothing."""
        if not all_ranks(ok, self.world):
            raise ValueError(f"{path}: not visible on every rank; checkpoints must be on a filesystem shared by all nodes")

    def _prune(self, newest: Path) -> None:
        complete = sorted(d for d in self.directory.glob(f"{PREFIX}*") if d.is_dir() and d.name[len(PREFIX):].isdigit())
        for old in complete[: max(0, len(complete) - self.keep)]:
            if old != newest:
                # Renamed first: a deletion killed half-way must not leave a directory that
                # still has its meta.json and so looks complete.
                doomed = old.with_name(old.name + DELETING)
                old.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        for stale in [*self.directory.glob(f"{PREFIX}*{PARTIAL}"), *self.directory.glob(f"{PREFIX}*{DELETING}")]:
            shutil.rmtree(stale, ignore_errors=True)

    def resume(self, engine: Any, check: Callable[[dict[str, Any], Path], None] | None = None) -> Resumed | None:
        """Load the latest complete checkpoint into `engine`; None when there is none. `check`
        sees meta.json first and raises if this run cannot continue that one."""
        # Rank 0 decides which checkpoint; each rank reading `latest` itself could see
        # different tags through a lagging network filesystem.
        found = broadcast(latest_checkpoint(self.directory) if self.rank == 0 else None, self.world)
        if found is None:
            return None
        self._require_shared(_complete(found), found)
        meta = json.loads((found / "meta.json").read_text())
        if check is not None:
            check(meta, found)
        path, _ = engine.load_checkpoint(str(self.directory), tag=found.name, load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"{found}: DeepSpeed could not load this checkpoint")
        rank_file = found / f"rank-{self.rank:05d}.pt"
        rank_state = None
        if meta.get("world") == self.world and rank_file.is_file():
            rank_state = torch.load(rank_file, weights_only=True)
        return Resumed(int(meta["step"]), meta, rank_state)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _full_state_dict(engine: Any, *, wanted: bool) -> dict[str, torch.Tensor]:
    """The whole fp32 model on the rank that writes it. Under ZeRO-3 every rank must take part
    in gathering the partitions, wanted or not."""
    with gathered_module(engine) as module:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()} if wanted else {}


def check_resumable(cfg: Config, world: int, meta: dict[str, Any], where: Path) -> None:
    """A resume under a different model, batch or optimizer-state layout would not be the same
    run (or would fail deep inside DeepSpeed): say so in one line, before loading anything."""
    saved, now = meta.get("config", {}), cfg.to_dict()
    # data.device and data.loader: each loader (and DALI's CPU and GPU graphs) saves a state of its own.
    for section, key in (("model", None), ("data", "batch_size"), ("data", "device"), ("data", "loader"), ("engine", "zero_stage"), ("optim", "name")):
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


def latest_weights(checkpoints: Path) -> Path:
    """`model.safetensors` of the newest complete checkpoint under `checkpoints`."""
    found = latest_checkpoint(checkpoints) if Path(checkpoints).is_dir() else None
    if found is None:
        raise ValueError(f"{checkpoints}: no complete checkpoint")
    return found / "model.safetensors"


def export_run(run: Path, out: Path) -> Path:
    """Write the latest complete checkpoint of `run` as plain weights with the run's config; returns `out`."""
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run directory")
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run}: not a run directory (no config.yaml)")
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir():
        raise ValueError(f"{run}: has no checkpoints/ directory: nothing to export")
    state, _ = read_weights(latest_weights(checkpoints))
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError:
        raise ValueError(f"{config_file}: is not valid YAML") from None
    # Checked now, not at load time: an export whose config cannot be rebuilt is useless.
    config_from_dict(config, source=str(config_file))
    write_weights(state, out, config)
    return out
