"""What the launcher told this process, read from its environment before anything heavy is
imported: its rank, the number of ranks, its rank on this node.

DeepSpeed's launcher and torchrun set RANK, WORLD_SIZE and LOCAL_RANK for every process they
start; a process started by hand is rank 0 of a world of one. Knowing the world before any
process group exists lets the config be checked against it at once, on every rank alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int

    @property
    def reports(self) -> bool:
        """Whether this process reports what every rank of its node finds alike (a bad config, a
        missing dataset): the first rank on each node, so a node's own mistake is still seen once."""
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment: {name} must be an integer, got '{text}'") from None


def launched() -> Launch:
    """This process's place in the launch, from RANK, WORLD_SIZE and LOCAL_RANK."""
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"environment: RANK {rank} does not lie in a WORLD_SIZE of {world}")
    return Launch(rank, world, _env_int("LOCAL_RANK", 0))


def local_batch(global_batch: int, world: int, micro_batches: int = 1) -> int:
    """Each of `world` ranks' share of the global batch, checked to split evenly, and into
    `micro_batches` GradCache chunks: known before any process group exists, so a batch the
    launch cannot split fails at once, not after the group and the model are built."""
    if global_batch % world:
        raise ValueError(f"config: data.batch_size {global_batch} is not divisible by {world} ranks")
    local = global_batch // world
    if local % micro_batches:
        raise ValueError(f"config: the local batch {local} ({global_batch} over {world} ranks) is not divisible by engine.micro_batches {micro_batches}")
    return local
