"""The typed config tree: one dataclass per component, merged defaults <- recipe <- overrides.

A recipe is a YAML mapping of sections (`data:`, `model:` ...) to keys. Command-line
overrides are `section.key=value`, the value parsed as a YAML scalar. Every key and type is
checked against the dataclasses, so a typo is an error naming the key and where it was set
(the recipe file or the command line), never a silent default.

Importing this module needs neither torch nor DeepSpeed: a command checks its config, and fails
on a typo, in a fraction of a second. The registries that name models, objectives and loss
backends are imported only once everything else in the config has been checked.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import write_text_atomic
from pipeline.augment_config import AugmentConfig
from trainer.recipe import ConfigError, check, coerce, parse_override, read_yaml, resolve_recipe


def _require(cond: bool, msg: str) -> None:
    """A value check inside a section's __post_init__: same error, same prefix."""
    check(cond, f"config: {msg}")


LOADERS = ("dali", "pil", "synthetic")


@dataclass
class DataConfig:
    train: str = ""  # directory written by `slip convert` (`slip demo` sets it)
    root: str = "data"  # where the embedded dataset is generated and converted
    batch_size: int = 4096  # global batch, over all ranks
    threads: int = 2  # DALI CPU threads per rank
    prefetch: int = 2  # batches DALI prepares ahead
    source_workers: int = 0  # processes reading JPEG bytes ahead for DALI (parallel external source); 0: in the trainer
    # dali | pil (the SLIP reference's PIL + torchvision DataLoader) | synthetic (random tensors on the device,
    # no files): pil and synthetic are for `slip profile step`; `slip train` refuses them
    loader: str = "dali"
    allow_synthetic: bool = False  # let `slip train` run on data.loader=synthetic: a smoke test of a node, nothing is learned
    device: str = "auto"  # where DALI decodes and augments: auto (the GPU when training on one) | cpu | gpu
    hw_decoder_load: float = -1.0  # share of JPEGs for the GPU's hardware decoder; -1: 0.95 on Hopper and newer, else 0.65

    def __post_init__(self) -> None:
        _require(self.loader in LOADERS, f"data.loader must be one of {list(LOADERS)}, got '{self.loader}'")
        _require(self.device in ("auto", "cpu", "gpu"), f"data.device must be one of ['auto', 'cpu', 'gpu'], got '{self.device}'")
        _require(self.batch_size > 0, "data.batch_size must be positive")
        _require(self.threads > 0, "data.threads must be positive")
        _require(self.prefetch > 0, "data.prefetch must be positive")
        _require(self.source_workers >= 0, "data.source_workers must be 0 or more")
        _require(self.hw_decoder_load == -1 or 0 <= self.hw_decoder_load <= 1, "data.hw_decoder_load must be in [0, 1], or -1 for the default")


@dataclass
class ModelConfig:
    size: str = "vitb16"  # a name in trainer.models.SIZES
    objective: str = "slip"  # a name in trainer.objectives.OBJECTIVES
    embed_dim: int = 512  # joint image-text space
    ssl_mlp_dim: int = 4096  # SimCLR head hidden width
    ssl_emb_dim: int = 256  # SimCLR head output
    context_length: int = 77
    vocab_size: int = 49408
    # FLIP's patch dropout in training: the fraction of patch tokens of the CLIP view dropped
    # before the first block, and of the two SimCLR views (-1: the CLIP view's).
    patch_dropout: float = 0.0
    ssl_patch_dropout: float = -1.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "ssl_mlp_dim", "ssl_emb_dim", "context_length", "vocab_size"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive")
        _require(0 <= self.patch_dropout < 1, f"model.patch_dropout is a fraction in [0, 1), got {self.patch_dropout}")
        _require(self.ssl_patch_dropout == -1 or 0 <= self.ssl_patch_dropout < 1,
                 f"model.ssl_patch_dropout is a fraction in [0, 1), or -1 for model.patch_dropout's, got {self.ssl_patch_dropout}")  # fmt: skip


@dataclass
class LossConfig:
    backend: str = "chunked"  # a name in kernels.contrastive.BACKENDS: chunked (tiled) or reference (the oracle)
    ssl_scale: float = 1.0
    ssl_temp: float = 0.1
    # CLIP's candidates from other ranks: exact (with gradient: the global batch's loss) or
    # detached (constants, as SLIP's reference gathers them). SimCLR's are always exact.
    clip_negatives: str = "exact"

    def __post_init__(self) -> None:
        _require(self.clip_negatives in ("exact", "detached"), f"loss.clip_negatives must be exact or detached, got '{self.clip_negatives}'")
        _require(self.ssl_temp > 0, "loss.ssl_temp must be positive")
        _require(self.ssl_scale >= 0, "loss.ssl_scale must be non-negative")


LR_SCALING = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}  # the exponent of batch_size / base_batch (trainer.optim.peak_lr)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate, reached after warm-up
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    lr_scaling: str = "sqrt"  # none | linear | sqrt: the peak lr is lr * (batch_size / base_batch) ** {0, 1, 1/2}
    base_batch: int = 4096  # the global batch `lr` was tuned at

    def __post_init__(self) -> None:
        _require(self.name in ("adamw", "lamb"), f"optim.name must be one of ['adamw', 'lamb'], got '{self.name}'")
        _require(self.lr > 0, "optim.lr must be positive")
        _require(self.lr_scaling in LR_SCALING, f"optim.lr_scaling must be one of {list(LR_SCALING)}, got '{self.lr_scaling}'")
        _require(self.base_batch > 0, "optim.base_batch must be positive")
        _require(self.weight_decay >= 0, "optim.weight_decay must be non-negative")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas must lie in [0, 1)")
        _require(self.eps > 0, "optim.eps must be positive")
        _require(self.grad_clip >= 0, "optim.grad_clip must be non-negative")


@dataclass
class ScheduleConfig:
    epochs: float = 25.0
    warmup_epochs: float = 1.0
    steps: int = 0  # total optimizer steps; 0 = derive from epochs
    start_lr: float = 1e-6  # learning rate at step 0 (SLIP's warm-up start)
    end_lr: float = 1e-5  # learning rate at the last step (SLIP's cosine floor)
    unmasked_steps: int = 0  # the last steps of the run without patch dropout (FLIP's unmasked tuning)

    def __post_init__(self) -> None:
        _require(self.unmasked_steps >= 0, "schedule.unmasked_steps must be non-negative")
        _require(self.epochs > 0, "schedule.epochs must be positive")
        _require(self.warmup_epochs >= 0, "schedule.warmup_epochs must be non-negative")
        _require(self.steps >= 0, "schedule.steps must be non-negative")
        _require(self.start_lr >= 0 and self.end_lr >= 0, "schedule.start_lr and schedule.end_lr must be non-negative")


@dataclass
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16
    zero_stage: int = 0
    micro_batches: int = 1  # chunks of the local batch per step, accumulated with GradCache (all negatives kept)
    activation_checkpointing: bool = False  # recompute both towers' blocks in backward: less memory, ~1/3 more compute

    def __post_init__(self) -> None:
        _require(self.micro_batches > 0, "engine.micro_batches must be positive")
        _require(self.device in ("auto", "cpu", "cuda"), f"engine.device must be auto, cpu or cuda, got '{self.device}'")
        _require(self.precision in ("fp32", "bf16"), f"engine.precision must be fp32 or bf16, got '{self.precision}'")
        _require(self.zero_stage in (0, 1, 2, 3), f"engine.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass
class EvalConfig:
    every_epochs: float = 0.0  # evaluate during training every this many epochs (and at the end); 0: never
    zeroshot: str = ""  # class-per-folder images or a labelled dataset (`slip demo` sets it); "": no zero-shot
    classnames: str = ""  # one per line; "": evaluation.prompts.zeroshot_classnames's rule (the README's)
    templates: str = ""  # clip80, slip7, or a file of prompts with {}; "": templates.txt beside the data, else SLIP's 7 for ImageNet, else CLIP's 80
    retrieval: str = ""  # a converted dataset for image-text recall; "" skips it
    batch_size: int = 256

    def __post_init__(self) -> None:
        _require(self.every_epochs >= 0, "eval.every_epochs must be 0 (never) or positive")
        _require(self.batch_size > 0, "eval.batch_size must be positive")


@dataclass
class RunConfig:
    name: str = "run"
    out: str = "runs"  # the run directory is out/name
    seed: int = 0
    log_every: int = 10  # steps between JSONL records
    checkpoint_every: int = 1000  # steps between checkpoints; one is always written at the end
    keep: int = 3  # complete checkpoints kept, newest first
    resume: bool = True  # continue from the run directory's latest checkpoint when it has one
    max_nonfinite: int = 20  # non-finite losses in a row before the run stops (each one skips its step)
    tensorboard: bool = True  # scalars under the run directory's tensorboard/
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "slipstream"

    def __post_init__(self) -> None:
        _require(self.checkpoint_every >= 0, "run.checkpoint_every must be 0 (only at the end) or positive")
        _require(self.keep > 0, "run.keep must be positive")
        _require(self.max_nonfinite > 0, "run.max_nonfinite must be positive")
        _require(self.log_every > 0, "run.log_every must be positive")
        _require(bool(self.name) and "/" not in self.name, f"run.name must be a non-empty name without '/', got '{self.name}'")
        _require(self.seed >= 0, "run.seed must be non-negative")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}

    def dump(self, path: Path) -> None:
        """Write the resolved config, atomically, so a run directory always says what made it."""
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def require_train_data(cfg: Config, hint: str = "") -> None:
    """A command that reads data.train refuses an empty one in one line (the synthetic loader reads
    nothing); `hint` adds the command's own way to set it."""
    check(bool(cfg.data.train) or cfg.data.loader == "synthetic", f"config: data.train is empty; set it to a directory written by `slip convert`{hint}")


COMMAND_LINE = "from the command line"

# Where a section (key None) or one of its keys was set, for the error that names it: "in FILE", "from the command line: k=v".
Origin = Callable[[str, str | None], str]


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, names: bool = True) -> Config:
    """defaults <- recipe file <- `section.key=value` overrides, every key and type checked.
    `names=False` leaves the registered names to `check_registered_names` (which imports torch),
    for a caller with checks of its own to make first."""
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str | None], str] = {}
    if recipe is not None:
        path = resolve_recipe(recipe)
        for section, values in read_yaml(path).items():
            check(isinstance(values, dict) or values is None, f"config: {path}: section '{section}' must be a mapping")
            merged[section] = dict(values or {})
            origins.update({(section, key): f"in {path}" for key in merged[section]})
            origins[(section, None)] = f"in {path}"
    for text in overrides:
        section, key, value = parse_override(text)
        merged.setdefault(section, {})[key] = value
        origins[(section, key)] = f"{COMMAND_LINE}: {text.strip()}"
        origins.setdefault((section, None), f"{COMMAND_LINE}: {text.strip()}")
    return _build(merged, lambda section, key: origins.get((section, key), "defaults"), names=names)


def config_from_dict(values: dict[str, Any], source: str = "a saved config") -> Config:
    """A Config from `Config.to_dict()` output (a run's config.yaml, an export's metadata), checked as a recipe is."""
    check(isinstance(values, dict), f"config: {source} must be a mapping of sections")
    for section, keys in values.items():
        check(isinstance(keys, dict), f"config: {source}: section '{section}' must be a mapping")
    return _build({section: dict(keys) for section, keys in values.items()}, lambda section, key: f"in {source}")


def _did_you_mean(section: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean '{section}.{close[0]}'?" if close else ""


def _build(merged: dict[str, dict[str, Any]], origin: Origin, names: bool = True) -> Config:
    # A config written before (a run's config.yaml, a checkpoint, exported weights, a recipe made
    # from one) may name the zero-shot data `data.zeroshot`, which an empty `eval.zeroshot` stood for.
    if "zeroshot" in merged.get("data", {}):
        old = merged["data"].pop("zeroshot")
        if old:
            merged.setdefault("eval", {})["zeroshot"] = merged["eval"].get("zeroshot") or old
    sections = _section_types()
    built: dict[str, Any] = {}
    for section, values in merged.items():
        where = origin(section, None)
        check(section in sections, f"config: unknown section '{section}' ({where}); known: {', '.join(sections)}")
        cls = sections[section]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            full = f"{section}.{key}"
            where = origin(section, key)
            check(key in hints, f"config: unknown key '{full}' ({where}){_did_you_mean(section, key, list(hints))}")
            try:
                kwargs[key] = coerce(full, value, hints[key])
            except ConfigError as err:
                raise ConfigError(f"{err} ({where})") from None
        try:
            built[section] = cls(**kwargs)
        except ConfigError:
            raise
        except ValueError as err:  # sections defined in pipeline/ raise plain ValueError
            raise ConfigError(f"config: {err}") from None
    cfg = Config(**built)
    # ZeRO partitions flattened parameter groups, so LAMB's per-layer trust ratio would be
    # taken per partition; DeepSpeed does not support the pair.
    check(cfg.optim.name != "lamb" or cfg.engine.zero_stage == 0, "config: optim.name lamb needs engine.zero_stage 0 (ZeRO would split LAMB's per-layer trust ratio)")
    if names:
        check_registered_names(cfg)
    return cfg


def check_registered_names(cfg: Config) -> None:
    """Names that select code are checked before anything is built or written. The registries
    import torch (and timm), so they are read last: every other mistake is reported without them."""
    from kernels.contrastive import BACKENDS
    from trainer.models import SIZES
    from trainer.objectives import OBJECTIVES

    for key, value, known in (
        ("model.size", cfg.model.size, SIZES),
        ("model.objective", cfg.model.objective, OBJECTIVES),
        ("loss.backend", cfg.loss.backend, BACKENDS),
    ):
        check(value in known, f"config: {key} '{value}' is not one of: {', '.join(known)}")
