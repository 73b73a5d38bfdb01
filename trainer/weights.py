"""Plain weights: a safetensors state dict with the resolved config inside, for use without DeepSpeed.

Checkpoints keep DeepSpeed's sharded optimizer and model states for resuming; this file
format is what leaves the training cluster. One file carries everything needed to rebuild
the model: the fp32 state dict, and the config it was trained with as JSON metadata, so a
reader needs `trainer.config`, `trainer.models` and safetensors, never DeepSpeed. Rank 0 writes
one into every complete checkpoint (`model.safetensors`); `slip export` copies the latest one
out with the run's config (`trainer.checkpoint.export_run`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.atomic import replacing
from trainer.build import model_from_config
from trainer.config import Config, config_from_dict
from trainer.models import SlipModel

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


def load_model(path: Path, device: str | torch.device = "cpu") -> SlipModel:
    """The model described by the file's own config, with its weights, in eval mode.

    Strict: a key that is missing, unexpected or of another shape means the file and the
    code disagree about the architecture, and a half-loaded model would fail silently later."""
    return load_model_and_config(path, device)[0]


def load_model_and_config(path: Path, device: str | torch.device = "cpu") -> tuple[SlipModel, Config]:
    """`load_model`, with the config the file carries (one read of the file)."""
    path = Path(path)
    state, config = read_weights(path)
    cfg = config_from_dict(config, source=str(path))
    # Initialising the model draws from torch's global RNG; loading weights should not move the caller's.
    with torch.random.fork_rng(devices=[]):
        model = model_from_config(cfg)
    check_fits(model, state, f"{path}: weights do not fit the model of its config")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """One line `what: ...` naming the first of the model's keys (in its order) that is missing or
    of another shape, else the first unexpected key: torch's own strict-load error lists every
    key over many lines."""
    expected = model.state_dict()
    for name, want in expected.items():
        if name not in state:
            raise ValueError(f"{what}: missing key '{name}' (model wants shape {tuple(want.shape)})")
        if tuple(state[name].shape) != tuple(want.shape):
            raise ValueError(f"{what}: '{name}' has shape {tuple(state[name].shape)}, model wants {tuple(want.shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise ValueError(f"{what}: unexpected key '{k}' (shape {tuple(state[k].shape)}; {len(unexpected)} unexpected)")
