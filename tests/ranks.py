"""Several gloo ranks in the test's own processes: spawned, waited for, and killed rather than left hanging."""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, world: int, args: tuple, *, timeout_s: float, what: str) -> None:
    """Run `worker(rank, *args)` on `world` processes; a failed rank raises here, and ranks still
    running after `timeout_s` are killed and the test fails naming `what`."""
    ctx = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish in {timeout_s:g} s")
