"""Checkpoints that are either complete or invisible, and the resume that reads them.

A checkpoint is the directory `checkpoints/step-NNNNNNNN/`. Every rank writes into
`step-NNNNNNNN.partial/` (DeepSpeed's model and optimizer states, and this rank's loader and
RNG state); after a barrier rank 0 adds `model.safetensors` (the full fp32 model, for `slip
export`) and `meta.json`, renames the directory to its final name, and only then moves the
`latest` pointer (itself replaced atomically). A process killed at any moment therefore
leaves either the previous checkpoint as `latest` or the new one complete; a `.partial`
directory is garbage that the next save removes. The last `keep` checkpoints are kept.

DeepSpeed loads its files with `torch.load(weights_only=False)`; the engine's checkpoint
engine is replaced by one that loads with `weights_only=True`, so a checkpoint cannot run
code. slipstream's own per-rank state is tensors, ints and bytes, which that allows.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pipeline.atomic import write_json_atomic, write_text_atomic

PREFIX = "step-"
PARTIAL = ".partial"
DELETING = ".deleting"


def _deepspeed_records() -> list[type]:
    """The plain-data classes DeepSpeed's ZeRO states pickle (found by loading stages 0-3);
    allowing these three is far narrower than weights_only=False, which runs any code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True."""

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_deepspeed_records()):
            return torch.load(path, map_location=map_location, weights_only=True)


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

    def attach(self, engine: Any) -> None:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine()

    def save(self, engine: Any, step: int, meta: dict[str, Any], rank_state: dict[str, Any], weights_config: dict[str, Any]) -> Path:
        """Checkpoint after `step` steps (the next step to run is `step`). Collective: every rank calls it."""
        import torch.distributed as dist

        tag = tag_of(step)
        partial = self.directory / f"{tag}{PARTIAL}"
        final = self.directory / tag
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a save killed earlier
            partial.mkdir(parents=True)
        _barrier(dist, self.world)
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
        _barrier(dist, self.world)
        if self.rank == 0:
            from trainer.export import write_weights

            write_weights(state, partial / "model.safetensors", weights_config)
            write_json_atomic(partial / "meta.json", {**meta, "step": step, "world": self.world})
            _fsync_dir(partial)
            if final.exists():  # the same step saved by an earlier attempt of this run
                shutil.rmtree(final)
            partial.rename(final)
            _fsync_dir(self.directory)
            write_text_atomic(self.directory / "latest", tag)
            self._prune(final)
        _barrier(dist, self.world)
        return final

    def _require_shared(self, ok: bool, path: Path) -> None:
        """Every rank must see what rank 0 made; otherwise a node would resume from nothing."""
        if not _all_ranks(ok, self.world):
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
        found = _broadcast(latest_checkpoint(self.directory) if self.rank == 0 else None, self.world)
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


def _barrier(dist: Any, world: int) -> None:
    if world > 1:
        dist.barrier()


def _all_ranks(ok: bool, world: int) -> bool:
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1.0 if ok else 0.0])  # (1,) gloo reduces CPU tensors; NCCL worlds use a CPU group here too
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_cpu_group())
    return bool(flag.item())


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    """A gloo group over all ranks, for the few small host-side agreements a save needs."""
    global _CPU_GROUP
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


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
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _cpu_copy(module) if wanted else {}
    return _cpu_copy(module) if wanted else {}


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
