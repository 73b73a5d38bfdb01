"""The GPU twin of the CPU loader tests: DALI's mixed (nvJPEG) decode path."""
from pathlib import Path

import pytest
import torch

from pipeline.augment import AugmentConfig
from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler

pytestmark = pytest.mark.gpu


def test_gpu_pipeline_batch_contract(tmp_path: Path, make_shapes_beton) -> None:
    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=32))
    aug = AugmentConfig(image_size=32)
    gpu = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), ("image", "aug1", "aug2"), aug, device="gpu")
    cpu = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), ("image", "aug1", "aug2"), aug, device="cpu")
    g, c = next(gpu), next(cpu)
    for view in ("image", "aug1", "aug2"):
        assert g[view].is_cuda and g[view].shape == (8, 3, 32, 32) and g[view].dtype == torch.float32
    assert g["text"].is_cuda and torch.equal(g["text"].cpu(), c["text"])
    assert torch.equal(g["index"].cpu(), c["index"])
