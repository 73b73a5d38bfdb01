"""Training's entry points fail on a bad config at once, in one line, before anything heavy is
imported and before any process group exists; under a launcher only one rank a node reports it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "deepspeed", "nvidia.dali", "ffcv", "timm")
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _entry(module: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`module`'s main(args) in a fresh interpreter; stdout is the heavy modules it imported."""
    probe = (
        f"import sys; from {module} import main; rc = main({args!r}); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(rc)"
    )
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**clean, "CI": "true", **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,args", [("slip.main", ["train"]), ("trainer.train", [])])
def test_a_config_typo_is_one_line_naming_the_command_line_without_torch_or_deepspeed(module: str, args: list[str]) -> None:
    proc = _entry(module, [*args, "--config", "tiny_cpu", "data.bogus=1"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["slip: error: config: unknown key 'data.bogus' (from the command line: data.bogus=1)"]
    assert proc.stdout.strip() == ""  # none of torch, DeepSpeed, DALI, FFCV, timm was imported


def test_a_typo_in_the_recipe_names_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("data:\n  batch_size: 8\n  thraeds: 2\n")
    proc = _entry("slip.main", ["train", "--config", str(recipe)])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"slip: error: config: unknown key 'data.thraeds' (in {recipe}); did you mean 'data.threads'?"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.batch_size=15"], "config: data.batch_size 15 is not divisible by 2 ranks"),
        (["data.batch_size=6", "engine.micro_batches=2"], "config: the local batch 3 (6 over 2 ranks) is not divisible by engine.micro_batches 2"),
    ],
)
def test_a_batch_the_launch_cannot_split_is_reported_by_one_rank_before_any_group(tmp_path: Path, overrides: list[str], message: str) -> None:
    args = ["--config", "tiny_cpu", f"data.train={tmp_path / 'none'}", *overrides]
    ranks = [_entry("trainer.train", args, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_SIZE="2") for r in (0, 1)]
    assert [p.returncode for p in ranks] == [2, 2]
    assert ranks[0].stderr.splitlines() == [f"slip: error: {message}"]
    assert ranks[1].stderr == ""  # the same mistake, found alike on every rank: said once
    assert [p.stdout.strip() for p in ranks] == ["", ""]  # found before torch or DeepSpeed was imported


def test_a_launch_environment_that_makes_no_sense_is_one_line() -> None:
    proc = _entry("trainer.train", ["--config", "tiny_cpu", "data.train=x"], RANK="2", WORLD_SIZE="2")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["slip: error: environment: RANK 2 does not lie in a WORLD_SIZE of 2"]
