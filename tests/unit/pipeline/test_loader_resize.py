"""The DALI loader when the views' sides change with the step (progressive resolution, smaller
SimCLR views): each batch has its step's sides, the pipeline is rebuilt once per change and a
resume on either side of a change is exact."""
from __future__ import annotations

import pytest
import torch

from pipeline.augment_config import AugmentConfig, view_sizes
from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler

AUG = AugmentConfig(image_size=32, blur_sigma=(0.02, 0.3))
CHANGES = (3, 5)  # the steps whose sides differ from the step before's


def _sizes(step: int) -> tuple[int, int]:
    return (16, 16) if step < 3 else (32, 16) if step < 5 else (32, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, make_shapes_beton) -> BetonDataset:
    return BetonDataset(make_shapes_beton(tmp_path_factory.mktemp("shapes"), seed=8, train_size=48))


def _loader(dataset: BetonDataset, views=("image", "aug1", "aug2"), **kw) -> ThreeViewLoader:
    sampler = EpochSampler(len(dataset), 8, seed=2)
    return ThreeViewLoader(dataset, sampler, views, AUG, seed=6, threads=2, sizes=_sizes, **kw)


def _sides(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    return batch["image"].shape[-1], batch["aug1"].shape[-1]


@pytest.mark.slow  # compiles the kernels as DALI operators at two sides
def test_each_batch_has_its_steps_sides_and_each_change_rebuilds_once(dataset: BetonDataset) -> None:
    loader = _loader(dataset)
    origins = []
    for step in range(8):
        batch = next(loader)
        assert _sides(batch) == _sizes(step), step
        assert batch["aug2"].shape == batch["aug1"].shape and batch["image"].shape[:2] == (8, 3)
        assert torch.isfinite(batch["aug1"]).all() and batch["aug1"].std() > 0.1
        assert torch.equal(batch["index"], torch.from_numpy(loader.sampler.indices(step)))  # no step skipped or repeated
        origins.append(loader.origin)
    assert loader.resizes == len(CHANGES)
    assert origins == [0, 0, 0, 3, 3, 5, 5, 5]  # each new pipeline starts at its change's step
    loader.close()
    # A CLIP-only loader has no SimCLR view: the change of their side at step 5 rebuilds nothing.
    clip = _loader(dataset, views=("image",))
    assert [next(clip)["image"].shape[-1] for _ in range(7)] == [_sizes(s)[0] for s in range(7)]
    assert clip.resizes == 1 and clip.origin == 3
    clip.close()


@pytest.mark.slow
def test_a_resume_around_a_change_continues_bit_for_bit(dataset: BetonDataset) -> None:
    # The oracle is the uninterrupted loader. States are taken after steps 1 (the change two
    # steps ahead, already in the prefetch queue), 2 (the change is the next step), 3 (just
    # past it) and 4 (the next change is the next step).
    straight = _loader(dataset)
    batches, states = [], {}
    for step in range(8):
        batches.append({k: v.clone() for k, v in next(straight).items()})
        if step in (1, 2, 3, 4):
            states[step] = straight.state()
    straight.close()
    for saved, state in states.items():
        restored = _loader(dataset, start_step=saved + 1, state=state)
        for step in range(saved + 1, 8):
            got = next(restored)
            for key, want in batches[step].items():
                assert torch.equal(got[key], want), (saved, step, key)
        assert restored.resizes == sum(saved < c for c in CHANGES)  # a change the state was taken past is not redone
        restored.close()


def test_without_a_schedule_the_loader_keeps_the_configs_sides(dataset: BetonDataset) -> None:
    sampler = EpochSampler(len(dataset), 8, seed=2)
    aug = AugmentConfig(image_size=32, blur_sigma=(0.02, 0.3), ssl_image_size=32, resolution_start=16, resolution_ramp=(0, 1), resolution_step=16)
    loader = ThreeViewLoader(dataset, sampler, ("image", "aug1"), aug, threads=2)
    assert [_sides(next(loader)) for _ in range(2)] == [(32, 32)] * 2 and loader.resizes == 0  # the schedule is the caller's to pass
    loader.close()
    scheduled = ThreeViewLoader(dataset, sampler, ("image", "aug1"), aug, threads=2, sizes=lambda step: view_sizes(aug, step // 2))
    assert [_sides(next(scheduled)) for _ in range(3)] == [(16, 16), (16, 16), (32, 32)] and scheduled.resizes == 1
    scheduled.close()
