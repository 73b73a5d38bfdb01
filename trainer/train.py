"""Training's entry point: `slip train` and, for several processes, DeepSpeed's launcher
(`deepspeed --num_gpus N --module trainer.train --config RECIPE [k=v ...]`; the launcher spells
python's -m as --module)."""
from __future__ import annotations

import argparse
import sys

from pipeline.command import USER_ERRORS, quiet_under_ci, report
from trainer.config import load_config, require_train_data
from trainer.loop import TrainingStopped, train

EXIT_STOPPED = 3  # the run stopped itself (non-finite losses) after checkpointing


def run(recipe: str, overrides: list[str]) -> int:
    """Train the recipe with its overrides; print where the run ended (rank 0). Returns the exit code."""
    cfg = load_config(recipe, overrides)
    require_train_data(cfg)
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
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
