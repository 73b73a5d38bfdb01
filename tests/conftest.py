"""Shared test set-up: tiers are marked so CI runs all and a developer can pick."""
import os

import pytest

# Tests never reach a GPU by accident, and never wait on a progress bar.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CI", "true")
os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer and DeepSpeed draw bars of their own


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (multi-process, end to end)")
    config.addinivalue_line("markers", "distributed: spawns several processes with a gloo group")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
