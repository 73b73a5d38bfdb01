"""Checkpoints that are either complete or invisible, and the resume that reads them.

A checkpoint is the directory `checkpoints/step-NNNNNNNN/`. Every rank writes into
`step-NNNNNNNN.partial/` (DeepSpeed's model and optimizer states, and this rank's loader and
RNG state); after a barrier rank 0 adds `model.safetensors` (the full fp32 model, for `slip
export`), `meta.json` and `checksums.json` (size and sha256 of every file: `trainer.checksums`),
renames the directory to its final name, and only then moves the `latest` pointer (itself
replaced atomically). A process killed at any moment therefore leaves either the previous
checkpoint as `latest` or the new one complete; a `.partial` directory is garbage that the next
save removes. The last `keep` checkpoints are kept.

A resume verifies the checkpoint `latest` names against its checksums; a damaged one (a
truncated copy, a lost file, flipped bits) is reported in one line naming the file, and the
resume falls back to the newest intact one that is kept. `slip export` and `slip eval` pick
their weights the same way.

DeepSpeed's files load with `weights_only=True` (the engine's checkpoint engine is replaced
when it is built: `trainer.engine.build_engine`), so a checkpoint cannot run code.
slipstream's own per-rank state is tensors, ints and bytes, which that allows.

`slip export` copies the latest intact checkpoint's weights out of a run (`export_run`).
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.atomic import write_json_atomic, write_text_atomic
from trainer.checkpoint_io import DELETING, attempt, discard, fsync_dir, full_state_dict, naming_checkpoint
from trainer.checksums import DamagedCheckpoint, listed, load_failure, recording_loads, verify, write_manifest, write_piece
from trainer.config import Config, config_from_dict
from trainer.dist import all_ranks, broadcast
from trainer.weights import read_weights, write_weights

PREFIX = "step-"
PARTIAL = ".partial"


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


class NoIntactCheckpoint(ValueError):
    """A run directory whose checkpoints are all damaged; the message names it and the newest damage."""


def _checkpoint_dirs(checkpoints: Path) -> list[Path]:
    """Every renamed (so once complete) checkpoint directory, newest first."""
    return sorted((d for d in Path(checkpoints).glob(f"{PREFIX}*") if d.is_dir() and d.name[len(PREFIX):].isdigit()), reverse=True)


def _candidates(checkpoints: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints to try, newest first, and what is wrong with the `latest` pointer.

    `latest` says where to start: moved back by hand, it resumes an earlier checkpoint. When it
    is missing (a save killed between its rename and the pointer) every checkpoint is a candidate;
    when it names nothing (a copy that lost the directory) that is the first damage reported."""
    found = _checkpoint_dirs(checkpoints)
    pointer = Path(checkpoints) / "latest"
    if not pointer.is_file():
        return found, []
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        tag = "?"
    names = [d.name for d in found]
    if tag in names:
        return found[names.index(tag) :], []
    shown = tag if re.fullmatch(r"[\w.-]{1,40}", tag) else "something else"
    return found, [f"{pointer}: names {shown}, which is not a checkpoint directory"]


def warn_fallback(damaged: Collection[str], used: Path) -> None:
    """One line on stderr for each damaged checkpoint skipped, naming the one used instead."""
    for problem in damaged:
        print(f"slip: warning: {problem}; using the older checkpoint {used}", file=sys.stderr)


def _none_intact(checkpoints: Path, damaged: list[str], way_out: str) -> NoIntactCheckpoint:
    more = f"; {len(damaged) - 1} older one(s) damaged too" if len(damaged) > 1 else ""
    return NoIntactCheckpoint(f"{Path(checkpoints).parent}: no intact checkpoint ({damaged[0]}{more}); {way_out}")


def newest_intact(checkpoints: Path, names: Collection[str] | None = None) -> Path | None:
    """The newest checkpoint under `checkpoints` whose files `names` (default: all) are intact,
    warning in one line on stderr for each newer damaged one it skips; None when there is none
    at all, NoIntactCheckpoint when all are damaged. One process (export, evaluation)."""
    candidates, damaged = _candidates(checkpoints)
    for directory in candidates:
        try:
            verify(directory, names)
        except DamagedCheckpoint as err:
            damaged.append(str(err))
            continue
        warn_fallback(damaged, directory)
        return directory
    if damaged:
        raise _none_intact(checkpoints, damaged, f"restore the checkpoint from a copy, or remove {checkpoints} and train again")
    return None


@dataclass(frozen=True)
class Resumed:
    step: int  # the next global step to run
    meta: dict[str, Any]  # meta.json: counters and the config the checkpoint was written with
    rank_state: dict[str, Any] | None  # this rank's loader and RNG state; None if the world size changed
    path: Path | None = None  # the checkpoint directory it was loaded from
    damaged: tuple[str, ...] = ()  # one line for each newer checkpoint skipped as damaged (rank 0's account)


class CheckpointManager:
    def __init__(self, directory: Path, *, rank: int, world: int, keep: int) -> None:
        self.directory, self.rank, self.world, self.keep = Path(directory), rank, world, keep

    @property
    def latest_pointer(self) -> Path:
        return self.directory / "latest"

    def holds_checkpoints(self) -> bool:
        return self.latest_pointer.exists() or bool(_checkpoint_dirs(self.directory))

    def save(self, engine: Any, step: int, meta: dict[str, Any], rank_state: dict[str, Any], weights_config: dict[str, Any]) -> Path:
        """Checkpoint after `step` steps (the next step to run is `step`). Collective: every rank calls it.

        A write that fails on any rank (a full disk) fails the save on every rank once all have
        stopped writing: rank 0 then removes what it wrote, `latest` still names the previous
        checkpoint, and the failed rank's error is an OSError naming the checkpoint."""
        tag = tag_of(step)
        partial, final = self.directory / f"{tag}{PARTIAL}", self.directory / tag
        try:
            self._save(engine, tag, partial, meta | {"step": step, "world": self.world}, rank_state, weights_config)
        except BaseException as err:
            if self.rank == 0:
                discard(partial)  # every rank has agreed the save failed, so none writes into it any more
            mapped = naming_checkpoint(err, partial, final)
            if mapped is None:
                raise
            raise mapped from err
        return final

    def _save(self, engine: Any, tag: str, partial: Path, meta: dict[str, Any], rank_state: dict[str, Any], weights_config: dict[str, Any]) -> None:
        failure = None
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a save killed earlier
            failure = attempt(partial.mkdir, parents=True)
        self._agree(failure, tag)
        self._require_shared(partial.is_dir(), partial)
        try:
            engine.save_checkpoint(str(self.directory), tag=partial.name, save_latest=False)
            torch.save(rank_state, partial / f"rank-{self.rank:05d}.pt")
        except Exception as err:
            failure = err
        state = full_state_dict(engine, wanted=self.rank == 0)  # collective under ZeRO-3: every rank, failed or not
        if failure is None:
            # Synced and hashed before anything can call the checkpoint complete: a node that loses
            # power after the rename must not leave `latest` naming truncated files.
            failure = attempt(write_piece, partial, self.rank)
        self._agree(failure, tag)
        if self.rank == 0:
            failure = attempt(self._complete, partial, tag, state, meta, weights_config)
        self._agree(failure, tag)

    def _complete(self, partial: Path, tag: str, state: dict[str, torch.Tensor], meta: dict[str, Any], weights_config: dict[str, Any]) -> None:
        """Rank 0, once every rank has written its part: the files only it writes, then the rename and `latest`."""
        write_weights(state, partial / "model.safetensors", weights_config)
        write_json_atomic(partial / "meta.json", meta)
        write_manifest(partial)  # last: what it lists is all there is
        fsync_dir(partial)
        final = self.directory / tag
        if final.exists():  # the same step saved by an earlier attempt of this run
            shutil.rmtree(final)
        partial.rename(final)
        try:
            fsync_dir(self.directory)
            write_text_atomic(self.directory / "latest", tag)
        except BaseException:
            discard(final)  # `latest` never named it: the previous checkpoint stays the one a resume reads
            raise
        self._prune(final)

    def _agree(self, failure: Exception | None, tag: str) -> None:
        """Whether any rank failed, on every rank (a barrier too); if one did, each raises: its
        own error, or one saying that another rank failed."""
        if all_ranks(failure is None, self.world):
            return
        if failure is not None:
            raise failure
        raise OSError(f"{self.directory / tag}: not saved, another rank could not write its part of it")

    def _require_shared(self, ok: bool, path: Path) -> None:
        """Every rank must see what rank 0 made; otherwise a node would resume from nothing."""
        if not all_ranks(ok, self.world):
            raise ValueError(f"{path}: not visible on every rank; set run.out to a directory on a filesystem that every node mounts")

    def _prune(self, newest: Path) -> None:
        for old in _checkpoint_dirs(self.directory)[self.keep :]:
            if old != newest:
                discard(old)
        for stale in [*self.directory.glob(f"{PREFIX}*{PARTIAL}"), *self.directory.glob(f"{PREFIX}*{DELETING}")]:
            shutil.rmtree(stale, ignore_errors=True)

    def resume(self, engine: Any, check: Callable[[dict[str, Any], Path], None] | None = None) -> Resumed | None:
        """Load the newest intact checkpoint into `engine`; None when there is none. `check` sees
        meta.json first and raises if this run cannot continue that one. Collective."""
        # Rank 0 lists the candidates; each rank reading `latest` itself could see different
        # tags through a lagging network filesystem.
        candidates, damaged = broadcast(_candidates(self.directory) if self.rank == 0 else None, self.world)
        found = None
        for directory in candidates:
            self._require_shared(directory.is_dir(), directory)
            problem = self._damage(directory)
            if problem is None:
                found = directory
                break
            damaged.append(problem)
        if found is None:
            if damaged:
                way_out = f"restore the checkpoint from a copy, give run.name another name, or remove {self.directory} to start over"
                raise _none_intact(self.directory, damaged, way_out)
            return None
        meta = json.loads((found / "meta.json").read_text())
        if check is not None:
            check(meta, found)
        rank_file = found / f"rank-{self.rank:05d}.pt"
        path, rank_state, problem = None, None, None
        with recording_loads(engine) as files:
            try:
                path, _ = engine.load_checkpoint(str(self.directory), tag=found.name, load_lr_scheduler_states=False)
                files.append(str(rank_file))
                load_rank = path is not None and meta.get("world") == self.world and rank_file.is_file()
                rank_state = torch.load(rank_file, weights_only=True) if load_rank else None
            except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
                # Never torch's own message: it suggests weights_only=False, which lets a file run code.
                where = files[-1] if files else found
                problem = f"{where}: cannot be loaded as weights ({load_failure(err)}); remove {found} to resume from the checkpoint before it"
        if not all_ranks(problem is None, self.world):
            raise DamagedCheckpoint(problem or f"{found}: another rank could not load its part of this checkpoint")
        if path is None:
            raise DamagedCheckpoint(f"{found}: DeepSpeed found no model states in it; remove it to resume from the checkpoint before it")
        return Resumed(int(meta["step"]), meta, rank_state, found, tuple(damaged))

    def _damage(self, directory: Path) -> str | None:
        """None when every file of `directory` matches its checksums, else one line naming the
        first that does not (rank 0's account). Collective: each rank hashes every world-th file."""
        problem = None
        try:
            names = sorted(listed(directory))
            share = {*names[self.rank :: self.world], *(["meta.json"] if self.rank == 0 else [])}  # rank 0 reads meta.json next
            verify(directory, share)
        except DamagedCheckpoint as err:
            problem = str(err)
        if all_ranks(problem is None, self.world):
            return None
        if self.rank == 0 and problem is None:
            try:
                verify(directory)
                problem = f"{directory}: a file differs from its checksum as another rank reads it"
            except DamagedCheckpoint as err:
                problem = str(err)
        return problem


# data.device and data.loader: each loader (and DALI's CPU and GPU graphs) saves a state of its own.
_FIXED = (("data", "batch_size"), ("data", "device"), ("data", "loader"), ("engine", "zero_stage"), ("optim", "name"))


def check_resumable(cfg: Config, world: int, meta: dict[str, Any], where: Path) -> None:
    """A resume under a different model, batch or optimizer-state layout would not be the same
    run (or would fail deep inside DeepSpeed): say so in one line, before loading anything, with
    the two ways on: the checkpoint's value, or a new run."""
    saved, now, defaults = meta.get("config", {}), cfg.to_dict(), Config().to_dict()
    new_run = f"or give run.name another name to start a new run (or remove {where.parent} to start this one over)"
    for section, key in [*(("model", k) for k in now["model"]), *_FIXED]:
        was = saved.get(section, {}).get(key, defaults[section][key])  # a key the checkpoint predates had its default then
        if was != now[section][key]:
            name = f"{section}.{key}"
            raise ValueError(
                f"config: {name} is {_shown(now[section][key])} but {_shown(was)} in the checkpoint {where}; "
                f"set {name}={_shown(was)} to resume this run, {new_run}"
            )
    if cfg.engine.zero_stage > 0 and meta.get("world") != world:
        raise ValueError(
            f"{where}: written by {meta.get('world')} ranks, resumed on {world}; ZeRO stage {cfg.engine.zero_stage} partitions "
            f"the optimizer state by rank: resume on {meta.get('world')} ranks, {new_run}"
        )


def _shown(value: Any) -> str:
    """A value as a command-line override spells it."""
    return value if isinstance(value, str) else json.dumps(value)


def run_checkpoints(run: Path) -> Path:
    """`run`'s checkpoints/ directory; the one message for a directory that is not a run, whichever
    command was given it (`slip export`, `slip eval --checkpoint`)."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run directory")
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir():
        raise ValueError(f"{run}: not a run directory (it has no checkpoints/); `slip train` writes one at run.out/run.name")
    return checkpoints


def latest_weights(checkpoints: Path) -> Path:
    """`model.safetensors` of the newest checkpoint under `checkpoints` whose weights are intact."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        run_checkpoints(checkpoints.parent)
    found = newest_intact(checkpoints, ["model.safetensors"])
    if found is None:
        raise ValueError(f"{checkpoints.parent}: has no checkpoint yet; `slip train` writes one every run.checkpoint_every steps and at the end")
    return found / "model.safetensors"


def export_run(run: Path, out: Path) -> Path:
    """Write the newest intact checkpoint of `run` as plain weights with the run's config; returns `out`."""
    run, out = Path(run), Path(out)
    checkpoints = run_checkpoints(run)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing from the run directory; export needs the config the run was trained with")
    state, _ = read_weights(latest_weights(checkpoints))
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError:
        raise ValueError(f"{config_file}: is not valid YAML") from None
    # Checked now, not at load time: an export whose config cannot be rebuilt is useless.
    config_from_dict(config, source=str(config_file))
    write_weights(state, out, config)
    return out
