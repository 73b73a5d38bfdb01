"""Shared test set-up: tiers are marked so CI runs all and a developer can pick."""
import os

import pytest

# Tests never reach a GPU by accident, and never wait on a progress bar.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CI", "true")
os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer and DeepSpeed draw bars of their own


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _cuda():
    # The triton loss backend's kernels run under Triton's interpreter: the code the GPU
    # compiles, executed on the CPU. Read when the kernels are defined, so set first.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (multi-process, end to end)")
    config.addinivalue_line("markers", "distributed: spawns several processes with a gloo group")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_shapes_beton():
    """Builds a small converted shapes dataset under a directory: the common test input."""
    from pathlib import Path

    from pipeline import demo_dataset as shapes
    from pipeline.convert import ConvertOptions, convert
    from pipeline.sources import folder

    def make(root: Path, *, seed: int = 0, train_size: int = 32, shard_size: int = 10_000) -> Path:
        spec = shapes.ShapesSpec(seed=seed, train_size=train_size, zeroshot_per_class=1)
        raw = shapes.generate(root / "raw", spec, progress=False)
        options = ConvertOptions(max_side=64, captions_per_image=4, shard_size=shard_size, workers=1)
        convert(folder.iter_samples(raw / "train"), root / "beton", source="folder", options=options, progress=False)
        return root / "beton"

    return make


@pytest.fixture(autouse=True)
def _torch_threads_stay_put():
    """Importing ffcv sets torch's thread count to 1 for the whole process; a test that imports
    it must not make later in-process training slower, or numerically unlike a subprocess's."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
