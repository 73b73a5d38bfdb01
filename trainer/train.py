"""Entry point for the DeepSpeed launcher: `deepspeed --num_gpus N --module trainer.train --config RECIPE [k=v ...]`
(DeepSpeed's launcher spells python's -m as --module)."""
from __future__ import annotations

import sys

from trainer.cli import main

if __name__ == "__main__":
    # The launcher appends --local_rank=N; the rank is read from the environment instead.
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(["train", *argv]))
