"""Where this process runs and how it agrees with the others: every collective that is not a loss.

The losses gather their embeddings themselves (kernels.collectives); what is here keeps the
ranks on one path: a flag any rank raised, a metric averaged, a value rank 0 decided, a barrier.
Each is a no-op in a world of one, so single-process code calls them unconditionally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> Any:
        """The process group the loss gathers over; None in a single process."""
        return tdist.group.WORLD if self.world > 1 else None


def pick_device(requested: str) -> str:
    """`engine.device` resolved: auto is the GPU when there is one."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("config: engine.device is cuda but no CUDA device is visible")
    return requested


def agree(flags: list[bool], dist: DistInfo) -> list[bool]:
    """Whether any rank raised each flag: every rank must take the same branch, or collectives hang."""
    if dist.world == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=dist.device)  # (n_flags,)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_ranks(ok: bool, world: int) -> bool:
    """Whether every rank holds `ok` (host-side, over a gloo group)."""
    if world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])  # (1,) gloo reduces CPU tensors; NCCL worlds use a CPU group here
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN, group=_cpu_group())
    return bool(flag.item())


def reduce_mean(values: dict[str, torch.Tensor], dist: DistInfo) -> dict[str, float]:
    """Scalar metrics averaged over ranks (each rank's loss covers its own rows)."""
    stacked = torch.stack([v.reshape(()) for v in values.values()])  # (n_metrics,)
    if dist.world > 1:
        tdist.all_reduce(stacked)
        stacked /= dist.world
    return dict(zip(values, stacked.tolist()))


def broadcast(value: Any, world: int) -> Any:
    """Rank 0's `value` (any picklable object) on every rank."""
    if world == 1:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0, group=_cpu_group())
    return box[0]


def barrier(world: int) -> None:
    if world > 1:
        tdist.barrier()


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    """A gloo group over all ranks, for the few small host-side agreements (None: the world is gloo already)."""
    global _CPU_GROUP
    if tdist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = tdist.new_group(backend="gloo")
    return _CPU_GROUP
