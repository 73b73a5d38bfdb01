"""Checkpoint checksums: a damaged checkpoint is named in one line and the newest intact one is
used instead; none intact is one line; a file torch refuses is one line without its advice.
Checkpoints here are made by hand (random files laid out as a save lays them out); the real
engine's are in tests/integration/test_checkpoint_damage.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointManager, NoIntactCheckpoint, latest_weights, newest_intact, tag_of
from trainer.checksums import MANIFEST, DamagedCheckpoint, verify, write_manifest, write_piece, writer_rank
from trainer.weights import write_weights


def _checkpoint(checkpoints: Path, step: int, *, world: int = 1) -> Path:
    """A checkpoint directory with files named as DeepSpeed and slipstream name them, random contents."""
    d = checkpoints / tag_of(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096 + int.from_bytes(os.urandom(2), "little")))
    for rank in range(world):
        torch.save({"torch_rng": torch.randint(0, 255, (64,), dtype=torch.uint8)}, d / f"rank-{rank:05d}.pt")
        if world > 1:
            (d / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(3000 + rank))
    write_weights({"w": torch.randn(8, 3)}, d / "model.safetensors", {"step": step})
    (d / "meta.json").write_text(json.dumps({"step": step, "world": world, "config": {}}))
    for rank in range(world):
        write_piece(d, rank)
    write_manifest(d)
    (checkpoints / "latest").write_text(d.name)
    return d


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory keeping three checkpoints, the newest (step 6) named by `latest`."""
    for step in (2, 4, 6):
        _checkpoint(tmp_path / "run" / "checkpoints", step)
    return tmp_path / "run"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_lists_every_file_with_its_size_and_sha256_and_the_pieces_are_merged(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path / "checkpoints", 3, world=3)
    files = json.loads((d / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in d.iterdir() if p.name != MANIFEST)
    assert sorted(files) == on_disk and not any(n.startswith(".checksums") for n in on_disk)
    for name, entry in files.items():
        assert entry == {"size": (d / name).stat().st_size, "sha256": _sha256(d / name)}, name
    verify(d)


def test_each_rank_hashes_only_the_files_it_writes() -> None:
    assert writer_rank("rank-00007.pt") == 7
    assert writer_rank("zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert writer_rank("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert writer_rank("zero_pp_rank_0_mp_rank_00_model_states.pt") == 0
    assert writer_rank("mp_rank_00_model_states.pt") == 0
    assert writer_rank("model.safetensors") is None and writer_rank("meta.json") is None


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = int.from_bytes(os.urandom(4), "little") % len(data)
    data[i] ^= 1 + int.from_bytes(os.urandom(1), "little") % 255
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DAMAGE = {
    "truncated model states": ("mp_rank_00_model_states.pt", _truncate, "truncated"),
    "flipped byte in model states": ("mp_rank_00_model_states.pt", _flip_a_byte, "sha256 mismatch"),
    "flipped byte in the weights": ("model.safetensors", _flip_a_byte, "sha256 mismatch"),
    "deleted rank state": ("rank-00000.pt", Path.unlink, "missing"),
    "zero-byte manifest": (MANIFEST, lambda p: p.write_bytes(b""), "empty"),
    "garbage manifest": (MANIFEST, lambda p: p.write_bytes(os.urandom(100)), "unreadable"),
    "deleted manifest": (MANIFEST, Path.unlink, "missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_is_named_in_one_line_and_the_previous_one_is_used(run: Path, damage: str, capsys) -> None:
    name, harm, why = DAMAGE[damage]
    harm(run / "checkpoints" / tag_of(6) / name)
    with pytest.raises(DamagedCheckpoint, match=why):
        verify(run / "checkpoints" / tag_of(6))
    capsys.readouterr()
    assert newest_intact(run / "checkpoints") == run / "checkpoints" / tag_of(4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(run / "checkpoints" / tag_of(6) / name) in err[0] and why in err[0], err
    assert err[0].endswith(f"using the older checkpoint {run / 'checkpoints' / tag_of(4)}")


def test_export_and_eval_skip_damaged_weights_but_not_damaged_optimizer_state(run: Path, capsys) -> None:
    _truncate(run / "checkpoints" / tag_of(6) / "mp_rank_00_model_states.pt")
    assert latest_weights(run / "checkpoints") == run / "checkpoints" / tag_of(6) / "model.safetensors"  # its weights are whole
    _flip_a_byte(run / "checkpoints" / tag_of(6) / "model.safetensors")
    capsys.readouterr()
    assert latest_weights(run / "checkpoints") == run / "checkpoints" / tag_of(4) / "model.safetensors"
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_with_every_checkpoint_damaged_it_is_one_error_naming_the_run_and_nothing_else(run: Path, capsys) -> None:
    for step in (2, 4, 6):
        _truncate(run / "checkpoints" / tag_of(step) / "rank-00000.pt")
    capsys.readouterr()
    with pytest.raises(NoIntactCheckpoint) as err:
        newest_intact(run / "checkpoints")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{run}: no intact checkpoint") and str(run / "checkpoints" / tag_of(6)) in message
    assert "2 older one(s) damaged too" in message
    assert capsys.readouterr().err == ""  # no warnings before the error: one line in all


def test_latest_moved_back_by_hand_is_respected_and_a_missing_pointer_is_not_needed(run: Path, capsys) -> None:
    (run / "checkpoints" / "latest").write_text(tag_of(4) + "\n")
    assert newest_intact(run / "checkpoints") == run / "checkpoints" / tag_of(4)
    (run / "checkpoints" / "latest").unlink()  # a save killed between its rename and the pointer
    assert newest_intact(run / "checkpoints") == run / "checkpoints" / tag_of(6)
    assert capsys.readouterr().err == ""
    (run / "checkpoints" / "latest").write_text(tag_of(8))  # names a directory that is gone
    assert newest_intact(run / "checkpoints") == run / "checkpoints" / tag_of(6)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{run / 'checkpoints' / 'latest'}: names {tag_of(8)}" in err[0]


class FakeEngine:
    """What CheckpointManager.resume asks of DeepSpeed's engine: load_checkpoint through its checkpoint engine."""

    class Loader:
        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __init__(self) -> None:
        self.checkpoint_engine = self.Loader()
        self.loaded: list[str] = []

    def load_checkpoint(self, directory: str, tag: str, load_lr_scheduler_states: bool = True):
        self.loaded.append(tag)
        path = Path(directory) / tag / "mp_rank_00_model_states.pt"
        self.checkpoint_engine.load(str(path), map_location="cpu")
        return str(path), {}


def _manager(run: Path) -> CheckpointManager:
    return CheckpointManager(run / "checkpoints", rank=0, world=1, keep=3)


def _loadable(d: Path) -> None:
    torch.save({"module": {"w": torch.randn(4)}}, d / "mp_rank_00_model_states.pt")
    write_manifest(d)


def test_resume_falls_back_past_a_damaged_latest_and_says_which(run: Path) -> None:
    for step in (4, 6):
        _loadable(run / "checkpoints" / tag_of(step))
    _flip_a_byte(run / "checkpoints" / tag_of(6) / "rank-00000.pt")
    engine = FakeEngine()
    resumed = _manager(run).resume(engine)
    assert resumed is not None and resumed.step == 4 and resumed.path == run / "checkpoints" / tag_of(4)
    assert engine.loaded == [tag_of(4)] and resumed.rank_state is not None
    assert len(resumed.damaged) == 1 and str(run / "checkpoints" / tag_of(6) / "rank-00000.pt") in resumed.damaged[0]
    assert "load" not in vars(engine.checkpoint_engine)  # the recording wrapper is gone


class Evil:
    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


@pytest.mark.parametrize("which", ["rank-00000.pt", "mp_rank_00_model_states.pt"])
def test_a_file_torch_refuses_is_one_line_naming_it_without_the_weights_only_advice(run: Path, which: str, capsys) -> None:
    d = run / "checkpoints" / tag_of(6)
    _loadable(d)
    torch.save({"torch_rng": torch.zeros(3), "payload": Evil()}, d / which)
    write_manifest(d)  # its checksums match: the damage is in what it holds
    with pytest.raises(DamagedCheckpoint) as err:
        _manager(run).resume(FakeEngine())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{d / which}: cannot be loaded as weights") and "print" in message
    assert "weights_only" not in message and "trust" not in message
    assert f"remove {d}" in message
    assert "a checkpoint ran code" not in capsys.readouterr().out


def test_the_way_out_of_a_refused_file_works(run: Path) -> None:
    d = run / "checkpoints" / tag_of(6)
    torch.save({"payload": Evil()}, d / "rank-00000.pt")
    write_manifest(d)
    _loadable(run / "checkpoints" / tag_of(4))
    shutil.rmtree(d)  # as the message says: remove it to resume from the checkpoint before it
    resumed = _manager(run).resume(FakeEngine())
    assert resumed is not None and resumed.step == 4


def test_resume_with_no_intact_checkpoint_is_one_line_naming_the_run_and_its_ways_out(run: Path) -> None:
    for step in (2, 4, 6):
        (run / "checkpoints" / tag_of(step) / MANIFEST).write_bytes(b"")
    with pytest.raises(NoIntactCheckpoint) as err:
        _manager(run).resume(FakeEngine())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{run}: no intact checkpoint")
    assert f"remove {run / 'checkpoints'} to start over" in message and "run.name" in message
    shutil.rmtree(run / "checkpoints")  # the way out: the run starts over
    assert _manager(run).resume(FakeEngine()) is None
