"""The `slip` command: one parser over the verb groups, and one way of failing.

    slip demo | train | export | convert | inspect | verify | eval | profile

Each verb group lives in its own module (`slip.data`, `slip.train`, `slip.eval`,
`slip.profile`, `slip.demo`) and prints through `slip.output`. A failure is one line on stderr
(`SLIP_DEBUG=1` shows the traceback instead): exit code 2 for the user's input, 1 for the
operating system refusing a file operation, named by path and cause (`pipeline.command`).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.command import USER_ERRORS, quiet_under_ci, report
from slip import data, demo, profile, train
from slip import eval as eval_verbs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slip", description="SLIP / CLIP / SimCLR pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (demo, train, data, profile, eval_verbs):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_under_ci()
    # The deepspeed launcher appends --local_rank=N (`deepspeed --module slip profile step ...`);
    # the rank is read from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
