"""The sampler and the DALI CPU three-view loader, on a small converted shapes dataset."""

import numpy as np
import pytest
import torch

from pipeline.augment import AugmentConfig
from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler

AUG = AugmentConfig(image_size=32, blur_sigma=(0.02, 0.3))
MEAN = torch.tensor(AUG.mean)[:, None, None]
STD = torch.tensor(AUG.std)[:, None, None]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> BetonDataset:
    return BetonDataset(make_shapes_beton(tmp_path_factory.mktemp("shapes"), seed=5, train_size=48))


def _loader(dataset: BetonDataset, views=("image", "aug1", "aug2"), seed: int = 0, start_step: int = 0, **kw) -> ThreeViewLoader:
    sampler = EpochSampler(len(dataset), 8, seed=11)
    return ThreeViewLoader(dataset, sampler, views, AUG, seed=seed, start_step=start_step, threads=2, **kw)


def test_batch_contract(dataset: BetonDataset) -> None:
    loader = _loader(dataset)
    for _ in range(3):
        batch = next(loader)
        assert set(batch) == {"image", "aug1", "aug2", "text", "index"}
        for view in ("image", "aug1", "aug2"):
            x = batch[view]
            assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
            # Normalised with ImageNet statistics: the [0, 1] pixel range maps into [(0-m)/s, (1-m)/s].
            assert (x >= (0 - MEAN) / STD - 1e-4).all() and (x <= (1 - MEAN) / STD + 1e-4).all()
            assert x.std() > 0.1
        assert batch["text"].shape == (8, 77) and batch["text"].dtype == torch.int64
        assert batch["index"].shape == (8,) and batch["index"].dtype == torch.int64
        for row, i in zip(batch["text"], batch["index"].tolist()):
            options = torch.from_numpy(dataset.tokens(i)[: dataset.n_captions[i]].astype(np.int64))
            assert (options == row).all(dim=1).any()  # one of this sample's own captions


def test_objective_decides_the_outputs(dataset: BetonDataset) -> None:
    assert set(next(_loader(dataset, views=("aug2", "aug1"), text=False))) == {"aug1", "aug2", "index"}
    assert set(next(_loader(dataset, views=("image",)))) == {"image", "text", "index"}
    with pytest.raises(ValueError, match="views"):
        _loader(dataset, views=("crop",))


def test_same_seed_same_batches_other_seed_other_augmentations(dataset: BetonDataset) -> None:
    a, b, c = _loader(dataset, seed=3), _loader(dataset, seed=3), _loader(dataset, seed=4)
    for _ in range(2):
        x, y, z = next(a), next(b), next(c)
        for key in x:
            assert torch.equal(x[key], y[key])
        assert torch.equal(x["index"], z["index"])  # the sampler's order depends on its own seed only
        assert not torch.equal(x["aug1"], z["aug1"])


def test_views_differ_from_each_other(dataset: BetonDataset) -> None:
    batch = next(_loader(dataset))
    assert not torch.equal(batch["aug1"], batch["aug2"])
    assert not torch.equal(batch["image"], batch["aug1"])


def test_loader_resumes_at_a_step(dataset: BetonDataset) -> None:
    straight = _loader(dataset)
    batches = [next(straight) for _ in range(8)]  # crosses the 6-step epoch boundary
    indices = [b["index"] for b in batches]
    resumed = _loader(dataset, start_step=5)
    for step in range(5, 8):
        batch = next(resumed)
        assert torch.equal(batch["index"], indices[step])
        assert torch.equal(batch["text"], batches[step]["text"])  # the same caption drawn per epoch


def test_sampler_ranks_are_disjoint_and_cover_the_epoch() -> None:
    n, batch, world = 103, 20, 4
    samplers = [EpochSampler(n, batch, seed=1, rank=r, world=world) for r in range(world)]
    assert samplers[0].steps_per_epoch == 5  # drop-last: 3 samples sit out this epoch
    for epoch in range(2):
        seen = np.concatenate([s.indices(epoch * 5 + k) for s in samplers for k in range(5)])
        assert len(seen) == len(set(seen.tolist())) == 100
    assert not np.array_equal(samplers[0].indices(0), samplers[0].indices(5))  # a new order each epoch


def test_sampler_caption_choice_is_per_epoch_and_in_range() -> None:
    sampler = EpochSampler(500, 50, seed=2)
    n_captions = np.random.default_rng(0).integers(1, 6, 500)
    idx = np.arange(500)
    first = sampler.caption_choice(0, idx, n_captions)
    assert (first >= 0).all() and (first < n_captions).all()
    assert np.array_equal(first, sampler.caption_choice(9, idx, n_captions))  # same epoch
    assert not np.array_equal(first, sampler.caption_choice(10, idx, n_captions))  # next epoch
    multi = n_captions > 1
    assert len(np.unique(first[multi])) > 1


def test_sampler_rejects_impossible_batches() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        EpochSampler(100, 10, seed=0, world=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(5, 10, seed=0)
