"""Training's entry point: `slip train` and, for several processes, DeepSpeed's launcher
(`deepspeed --num_gpus N --module trainer.train --config RECIPE [k=v ...]`; the launcher spells
python's -m as --module).

The config is read and checked against the launch (its world size) before torch, DALI or
DeepSpeed is imported and before any process group exists: a mistake costs a fraction of a
second, not the minute it takes every rank to import, join the group and build the model. Such
a mistake is the same on every rank of a node, so only the node's first rank reports it.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.command import USER_ERRORS, exit_code, quiet_under_ci, report
from trainer.config import check_registered_names, load_config, require_train_data
from trainer.launch import launched, local_batch

EXIT_STOPPED = 3  # the run stopped itself (non-finite losses) after checkpointing


def run(recipe: str, overrides: list[str]) -> int:
    """Train the recipe with its overrides; print where the run ended (rank 0). Returns the exit code."""
    cfg = load_config(recipe, overrides, names=False)
    require_train_data(cfg)
    local_batch(cfg.data.batch_size, launched().world, cfg.engine.micro_batches)
    check_registered_names(cfg)  # the registries import torch and timm: last
    from trainer.loop import TrainingStopped, train  # torch, DALI, FFCV: seconds, so only for a valid config

    try:
        result = train(cfg)
    except TrainingStopped as stopped:
        print(f"slip: stopped: {stopped}", file=sys.stderr)
        return EXIT_STOPPED
    if not result.dist.is_main:
        return 0
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    if result.stopped_by_signal:
        print(f"stopped by a signal at step {result.steps}{resumed}, checkpoint written; run again to resume: {result.run_dir}")
    else:
        print(f"trained to step {result.steps}{resumed}; run directory: {result.run_dir}")
    return 0


def _group_exists() -> bool:
    """Whether this process has joined a process group (without importing torch to find out)."""
    tdist = sys.modules.get("torch.distributed")
    return tdist is not None and tdist.is_available() and tdist.is_initialized()


def report_once(err: BaseException) -> int:
    """A user error reported in one line. Before the process group exists every rank of a node
    found the same mistake, and only the node's first rank prints it; after, each rank's error
    may be its own, and each prints."""
    if _group_exists():
        return report(err)
    try:
        reports = launched().reports
    except ValueError:
        reports = True
    return report(err) if reports else exit_code(err)


def main(argv: list[str] | None = None) -> int:
    quiet_under_ci()
    parser = argparse.ArgumentParser(prog="trainer.train", description="train from a recipe (the launcher's entry point; `slip train` in one process)")
    parser.add_argument("--config", required=True, help="recipe name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    # The launcher appends --local_rank=N; the rank is read from the environment instead.
    args = parser.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")])
    try:
        return run(args.config, args.overrides)
    except USER_ERRORS as err:
        return report_once(err)


if __name__ == "__main__":
    sys.exit(main())
