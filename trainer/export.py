"""Plain weights: a safetensors state dict with the resolved config inside, for use without DeepSpeed.

Checkpoints keep DeepSpeed's sharded optimizer and model states for resuming; this file
format is what leaves the training cluster. One file carries everything needed to rebuild
the model: the fp32 state dict, and the config it was trained with as JSON metadata, so a
reader needs `trainer.config`, `trainer.models` and safetensors, never DeepSpeed. Rank 0 writes one into every complete
checkpoint (`model.safetensors`); `slip export` copies the latest one out with the run's
config.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.atomic import replacing

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.models.contrastive import ContrastiveModel

FORMAT = "slipstream-weights-v1"


def write_weights(state: Mapping[str, torch.Tensor], path: Path, config: dict[str, Any]) -> None:
    """Write `state` and `config` to `path`, whole or not at all.

    Tensors are copied to CPU as contiguous, unshared storage: safetensors refuses tensors
    that share memory (tied weights, views), and a GPU or ZeRO-gathered tensor must not be
    written from device memory. The copy goes to a temporary name in the same directory and
    is renamed over `path` only once it is on disk, so a reader never sees half a file."""
    path = Path(path)
    # Built before any file is touched: a config that is not JSON fails with nothing written.
    metadata = {"format": FORMAT, "config": json.dumps(config)}
    tensors = {
        name: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for name, t in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict (on CPU) and the config dict of a file written by `write_weights`.

    Every failure is one line naming the file: these files are passed around by hand, and
    "header too large" alone does not say which one was a stray download."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: not slipstream weights (safetensors metadata lacks format '{FORMAT}')")
            state = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({reason})") from None
    try:
        config = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: slipstream weights without a valid config in their metadata")
    return state, config


def load_model(path: Path, device: str | torch.device = "cpu") -> ContrastiveModel:
    """The model described by the file's own config, with its weights, in eval mode.

    Strict: a key that is missing, unexpected or of another shape means the file and the
    code disagree about the architecture, and a half-loaded model would fail silently later."""
    return load_model_and_config(path, device)[0]


def load_model_and_config(path: Path, device: str | torch.device = "cpu") -> tuple[ContrastiveModel, Config]:
    """`load_model`, with the config the file carries (one read of the file)."""
    from trainer.config import config_from_dict
    from trainer.models.from_config import model_from_config

    path = Path(path)
    state, config = read_weights(path)
    cfg = config_from_dict(config, source=str(path))
    # Initialising the model draws from torch's global RNG; loading weights should not move the caller's.
    with torch.random.fork_rng(devices=[]):
        model = model_from_config(cfg)
    _check_fits(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def _check_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: Path) -> None:
    # torch's own strict-load error lists every key over many lines; one line names the first.
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected"
    if missing:
        raise ValueError(f"{path}: weights do not fit the model of its config: missing key '{missing[0]}' ({counts})")
    if unexpected:
        raise ValueError(f"{path}: weights do not fit the model of its config: unexpected key '{unexpected[0]}' ({counts})")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            got = tuple(state[name].shape)
            raise ValueError(f"{path}: weights do not fit the model of its config: '{name}' has shape {got}, model wants {tuple(want.shape)}")


def latest_weights(checkpoints: Path) -> Path:
    """`model.safetensors` of the newest complete checkpoint under `checkpoints`."""
    from trainer.checkpoint import latest_checkpoint

    found = latest_checkpoint(checkpoints) if Path(checkpoints).is_dir() else None
    if found is None:
        raise ValueError(f"{checkpoints}: no complete checkpoint")
    return found / "model.safetensors"


def export_run(run: Path, out: Path) -> Path:
    """Write the latest complete checkpoint of `run` as plain weights with the run's config; returns `out`."""
    from trainer.config import config_from_dict

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
