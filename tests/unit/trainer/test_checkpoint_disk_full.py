"""A checkpoint save that fails on a full disk is one line naming the checkpoint, leaves no
`.partial` directory, keeps the previous checkpoint as `latest` and intact, and the run resumes
from it; with two ranks, one rank's failure fails the save on both instead of hanging the other."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import pipeline.atomic
import trainer.weights
from pipeline.command import report
from trainer.checkpoint import CheckpointManager, tag_of
from trainer.checksums import verify

sys.path.insert(0, str(Path(__file__).parent))
from tiny_engine import TinyEngine  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


def _save(manager: CheckpointManager, engine: TinyEngine, step: int) -> Path:
    return manager.save(engine, step, {"counters": {"seen": step}}, {"torch_rng": torch.get_rng_state()}, {"model": "tiny"})


def _fail_torch_save(monkeypatch: pytest.MonkeyPatch, name: str, error: Exception) -> None:
    original = torch.save

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if Path(str(f)).name == name:
            raise error
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _engine_states(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_torch_save(monkeypatch, "mp_rank_00_model_states.pt", ENOSPC)


def _rank_state_unexpected_pos(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save on a full disk: no errno, no path; recognised by the disk having no space left.
    _fail_torch_save(monkeypatch, "rank-00000.pt", RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 64 vs 0"))
    monkeypatch.setattr(pipeline.atomic, "_disk_full", lambda directory: True)


def _weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def save_file(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer.weights, "save_file", save_file)


def _latest_pointer(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Path.write_text

    def write_text(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".latest.tmp"):
            raise ENOSPC
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


FAILURES: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "engine-states-enospc": (_engine_states, "{final}"),
    "rank-state-unexpected-pos": (_rank_state_unexpected_pos, "{final}"),
    "weights-safetensors": (_weights, "{final}"),
    "latest-pointer-after-rename": (_latest_pointer, "{checkpoints}/latest"),  # the checkpoint itself was complete
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_save_on_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_latest(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(checkpoints, rank=0, world=1, keep=3)
    engine = TinyEngine()
    previous = _save(manager, engine, 2)
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with torch.no_grad():
        engine.module.weight.add_(torch.randn_like(engine.module.weight))  # a step later, other weights

    inject, named = FAILURES[failure]
    inject(monkeypatch)
    with pytest.raises(Exception) as caught:
        _save(manager, engine, 4)
    monkeypatch.undo()  # space freed
    assert report(caught.value) == 1
    final = checkpoints / tag_of(4)
    assert capsys.readouterr().err == f"slip: error: {named.format(final=final, checkpoints=checkpoints)}: no space left on device\n"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", previous.name]  # no .partial, .deleting or temporary
    assert (checkpoints / "latest").read_text() == previous.name
    verify(previous)

    fresh = TinyEngine()
    resumed = manager.resume(fresh)
    assert resumed is not None and resumed.step == 2 and resumed.path == previous
    assert all(torch.equal(fresh.module.state_dict()[k], v) for k, v in weights.items())
    assert _save(manager, fresh, 4) == final and (checkpoints / "latest").read_text() == final.name
    verify(final)


TWO_RANKS = """
import errno, os, sys
from pathlib import Path
import torch
import torch.distributed as dist

rank, checkpoints, port = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, sys.argv[4])
from tiny_engine import TinyEngine
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from pipeline.command import report
from trainer.checkpoint import CheckpointManager

manager = CheckpointManager(checkpoints, rank=rank, world=2, keep=3)
engine = TinyEngine(rank)
manager.save(engine, 2, {}, {"torch_rng": torch.get_rng_state()}, {})
if rank == 1:
    original = torch.save
    def save(obj, f, *args, **kwargs):
        if Path(str(f)).name == "rank-00001.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(obj, f, *args, **kwargs)
    torch.save = save
try:
    manager.save(engine, 4, {}, {"torch_rng": torch.get_rng_state()}, {})
except Exception as err:
    sys.exit(report(err))
"""


@pytest.mark.slow
def test_one_ranks_full_disk_fails_the_save_on_every_rank_without_a_hang(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CI": "true"}
    ranks = [
        subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(rank), str(checkpoints), str(port), str(Path(__file__).parent)], env=env, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        errs = [rank.communicate(timeout=180)[1] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    final = checkpoints / tag_of(4)
    assert [rank.returncode for rank in ranks] == [2, 1], errs
    assert errs[1] == f"slip: error: {final}: no space left on device\n"
    assert errs[0] == f"slip: error: {final}: not saved, another rank could not write its part of it\n"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", tag_of(2)]
    assert (checkpoints / "latest").read_text() == tag_of(2)
    verify(checkpoints / tag_of(2))
