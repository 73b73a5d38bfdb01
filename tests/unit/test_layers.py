"""The design holds: the import layers of ../shared/DESIGN.md (import-linter's contracts in
pyproject.toml) and ruff's checks, run the way a developer runs them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "kernels", "evaluation", "trainer", "profiling", "slip")


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: `make setup` installs the dev extras"
    return found


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the packages under `root`, not the installed ones
    return subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold() -> None:
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


def test_an_import_against_the_layers_breaks_a_contract(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "pipeline" / "atomic.py", "a") as f:
        f.write("\nimport trainer.config  # noqa: E402,F401\n")  # the lowest layer reaching up
    with open(tmp_path / "trainer" / "models" / "text.py", "a") as f:
        f.write("\nimport trainer.config  # noqa: E402,F401\n")  # the models leaf reaching into the trainer
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "pipeline.atomic -> trainer.config" in proc.stdout and "trainer.models.text -> trainer.config" in proc.stdout


def test_ruff_finds_nothing() -> None:
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
