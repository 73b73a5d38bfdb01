"""`slip train` and `slip export`: a run from a recipe, and its weights out of the run."""
from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import run

    return run(args.config, args.overrides)


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.checkpoint import export_run
    from trainer.weights import read_weights

    out = export_run(Path(args.run), Path(args.out))
    state, _ = read_weights(out)  # read back: the summary describes the file as written
    values = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {values:,} parameters and buffers")
    return 0


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train from a recipe in one process (use `deepspeed --module trainer.train` for many)")
    add_recipe_arguments(tr)
    tr.set_defaults(func=_cmd_train)

    exp = sub.add_parser("export", help="write a run's latest checkpoint as plain safetensors weights with its config")
    exp.add_argument("run", help="run directory written by `slip train`")
    exp.add_argument("--out", required=True, help="the .safetensors file to write (replaced if it exists)")
    exp.set_defaults(func=_cmd_export)
