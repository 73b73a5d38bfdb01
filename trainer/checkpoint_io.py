"""The file-level steps of a checkpoint save (trainer.checkpoint), and what a failed one leaves:
nothing that looks like a checkpoint, and one error naming it.

A save writes into `step-N.partial/` from every rank and renames it when complete. A write
that fails (a full disk: torch.save then raises RuntimeError("... unexpected pos ...") with
no path, a plain write() an OSError with none) must not stop that rank before the next point
where the ranks agree, or the others would wait for it for ever: `attempt` hands the error back
instead. Whatever was written is then removed (`discard`) and the error names the checkpoint
(`naming_checkpoint`), not a file in a directory that is gone by the time it is read.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import as_os_error
from trainer.engine import gathered_module

DELETING = ".deleting"  # suffix of a checkpoint directory being removed


def attempt(write: Callable[..., Any], *args: Any, **kwargs: Any) -> Exception | None:
    """What `write` raised, or None."""
    try:
        write(*args, **kwargs)
    except Exception as err:
        return err
    return None


def discard(directory: Path) -> None:
    """Removed, renamed first: a deletion cut short must not leave a directory that still has its
    meta.json and so looks complete."""
    doomed = directory.with_name(directory.name + DELETING)
    with contextlib.suppress(OSError):
        directory.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def naming_checkpoint(err: BaseException, partial: Path, final: Path) -> OSError | None:
    """An OS failure of the save of `final` (written under `partial`) as an OSError naming
    `final`; None for an error that is not an OS failure, or names a file outside the checkpoint."""
    named = getattr(err, "filename", None)
    if isinstance(err, OSError) and err.errno is not None and isinstance(named, (str, bytes)):
        path = Path(os.fsdecode(named))
        if any(path == d or d in path.parents for d in (partial, final)):
            return OSError(err.errno, os.strerror(err.errno), str(final))
        return None
    return as_os_error(err, final)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_state_dict(engine: Any, *, wanted: bool) -> dict[str, torch.Tensor]:
    """The whole fp32 model on the rank that writes it. Under ZeRO-3 every rank must take part
    in gathering the partitions, wanted or not."""
    with gathered_module(engine) as module:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()} if wanted else {}
