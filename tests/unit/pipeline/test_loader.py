"""The sampler and the DALI CPU three-view loader, on a small converted shapes dataset."""

import shutil
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.augment_config import AugmentConfig
from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler
from pipeline.schema import DatasetError

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


def _damaged_copy(dataset: BetonDataset, dest, damage: dict[int, Callable[[np.ndarray], np.ndarray]]) -> BetonDataset:
    """A copy of the dataset whose listed samples' stored JPEG bytes are rewritten in place."""
    shutil.copytree(dataset.directory, dest)
    for index, rewrite in damage.items():
        shard, i = dataset._locate(index)
        start, size = int(shard.image_ptr[i]), int(shard.image_size[i])
        with open(dest / shard.path.name, "r+b") as f:
            f.seek(start)
            data = np.frombuffer(f.read(size), dtype=np.uint8).copy()
            f.seek(start)
            f.write(rewrite(data).tobytes())
    return BetonDataset(dest)


def _zero_header(data: np.ndarray) -> np.ndarray:
    data[:4] = 0
    return data


def _truncate(data: np.ndarray) -> np.ndarray:
    data[len(data) // 2 :] = 0  # the file keeps its length, the JPEG loses its second half
    return data


def _bogus_huffman_table(data: np.ndarray) -> np.ndarray:
    # Structurally sound (markers, sizes, EOI) but the decoder rejects the table.
    pos = 2
    while data[pos + 1] != 0xC4:
        pos += 2 + ((int(data[pos + 2]) << 8) | int(data[pos + 3]))
    length = (int(data[pos + 2]) << 8) | int(data[pos + 3])
    data[pos + 4 : pos + 2 + length] = 0xEE
    return data


def test_corrupt_samples_are_replaced_counted_and_logged(dataset: BetonDataset, tmp_path, caplog) -> None:
    damaged = _damaged_copy(dataset, tmp_path / "damaged", {3: _zero_header, 17: _truncate})
    sampler = EpochSampler(len(damaged), 8, seed=11)
    clean = ThreeViewLoader(dataset, sampler, ("image",), AUG, seed=0, threads=2)
    loader = ThreeViewLoader(damaged, sampler, ("image",), AUG, seed=0, threads=2)
    with caplog.at_level("WARNING", logger="slipstream.loader"):
        seen_clean = np.concatenate([next(clean)["index"].numpy() for _ in range(2 * sampler.steps_per_epoch)])
        batches = [next(loader) for _ in range(2 * sampler.steps_per_epoch)]
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert 3 not in seen and 17 not in seen
    swapped = seen != seen_clean
    assert set(seen_clean[swapped]) == {3, 17} & set(seen_clean)
    assert np.array_equal(seen[swapped], seen_clean[swapped] + 1)  # the next readable sample: 4 and 18
    assert loader.replaced == int(swapped.sum()) > 0
    assert loader.corrupt == {3: "not_jpeg", 17: "truncated"}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("sample 3 is corrupt (not_jpeg)" in m for m in messages) == 1  # logged once, not per epoch
    assert any("sample 17 is corrupt (truncated)" in m and "shard-00000.beton" in m for m in messages)
    for b in batches:  # the batch keeps its contract
        assert b["image"].shape == (8, 3, 32, 32) and torch.isfinite(b["image"]).all()
        assert b["text"].shape == (8, 77)


def test_undecodable_sample_is_found_and_the_pipeline_rebuilt(dataset: BetonDataset, tmp_path) -> None:
    sampler = EpochSampler(len(dataset), 8, seed=11)
    victim = int(sampler.indices(2)[5])  # read at step 2, while earlier batches are fine
    damaged = _damaged_copy(dataset, tmp_path / "damaged", {victim: _bogus_huffman_table})
    loader = ThreeViewLoader(damaged, sampler, ("image", "aug1"), AUG, seed=0, threads=2)
    batches = [next(loader) for _ in range(sampler.steps_per_epoch)]
    seen = np.concatenate([b["index"].numpy() for b in batches])
    assert victim not in seen
    assert loader.corrupt == {victim: "undecodable"}
    assert loader.replaced == 1
    assert [int(b["index"][0]) for b in batches] == [int(sampler.indices(s)[0]) for s in range(len(batches))]


def test_batches_stay_valid_after_later_batches(dataset: BetonDataset) -> None:
    # The views are DALI's buffers, not copies: they must not be reused while held.
    loader = _loader(dataset)
    first = next(loader)
    kept = {k: v.clone() for k, v in first.items()}
    later = [next(loader) for _ in range(5)]
    for k in kept:
        assert torch.equal(first[k], kept[k])
    pointers = {b["aug1"].data_ptr() for b in [first, *later]}
    assert len(pointers) == 6


def test_a_corrupt_stand_in_is_skipped_too(dataset: BetonDataset, tmp_path) -> None:
    damaged = _damaged_copy(dataset, tmp_path / "damaged", {3: _zero_header, 4: _truncate})
    loader = _loader(damaged)
    seen = np.concatenate([next(loader)["index"].numpy() for _ in range(2 * loader.sampler.steps_per_epoch)])
    assert 3 not in seen and 4 not in seen
    assert loader.source.replacement(3) == 5 and loader.source.replacement(4) == 5
    assert loader.corrupt == {3: "not_jpeg", 4: "truncated"}


def test_a_dataset_without_a_readable_sample_is_an_error(dataset: BetonDataset, tmp_path) -> None:
    damaged = _damaged_copy(dataset, tmp_path / "damaged", {i: _zero_header for i in range(len(dataset))})
    with pytest.raises(DatasetError, match="no sample has a readable JPEG"):
        next(_loader(damaged))


def test_views_are_dalis_buffers_not_copies(dataset: BetonDataset) -> None:
    loader = _loader(dataset)
    outputs = loader.pipe.run()
    view = outputs[1].as_tensor()
    assert loader._to_torch(outputs[1]).data_ptr() == view.data_ptr()


@pytest.mark.slow
def test_parallel_source_gives_the_same_batches(dataset: BetonDataset, tmp_path) -> None:
    # Spawned reader processes, corrupt samples included: the batches are those read in-process.
    damaged = _damaged_copy(dataset, tmp_path / "damaged", {3: _zero_header, 17: _truncate})
    inline = _loader(damaged, seed=4, start_step=3)
    parallel = _loader(damaged, seed=4, start_step=3, source_workers=2)
    for _ in range(2 * inline.sampler.steps_per_epoch):
        a, b = next(inline), next(parallel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert parallel.replaced == inline.replaced > 0 and parallel.corrupt == inline.corrupt


@pytest.mark.parametrize("source_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_loader_restored_from_its_state_continues_bit_for_bit(dataset: BetonDataset, source_workers: int) -> None:
    # The oracle is the uninterrupted loader: the state taken after step 2 (with batches
    # already prefetched past it) must make a new loader hand out steps 3.. exactly.
    straight = _loader(dataset, seed=5, source_workers=source_workers)
    batches, state = [], None
    for step in range(6):
        batches.append({k: v.clone() for k, v in next(straight).items()})
        if step == 2:
            state = straight.state()
    restored = _loader(dataset, seed=5, start_step=3, state=state, source_workers=source_workers)
    for step in range(3, 6):
        got = next(restored)
        for key, want in batches[step].items():
            assert torch.equal(got[key], want), (step, key)
    # A fresh loader started at step 3 reads the same samples but draws new augmentations.
    fresh = next(_loader(dataset, seed=5, start_step=3))
    assert torch.equal(fresh["index"], batches[3]["index"]) and not torch.equal(fresh["aug1"], batches[3]["aug1"])
    # The state says which graph drew it: the other device's graph draws otherwise, so it is refused.
    assert state["device"] == "cpu"
    with pytest.raises(ValueError, match="saved state comes from a gpu graph"):
        _loader(dataset, seed=5, start_step=3, state={**state, "device": "gpu"})


def test_a_resume_after_an_undecodable_sample_continues_bit_for_bit(dataset: BetonDataset, tmp_path) -> None:
    # The rebuild after DALI's decoder failed changed the pipeline; the state must carry both
    # that pipeline's draws and the verdict, or the resumed run would fail and rebuild again
    # with other draws when the sample comes round in the next epoch.
    sampler = EpochSampler(len(dataset), 8, seed=11)
    victim = int(sampler.indices(1)[2])
    damaged = _damaged_copy(dataset, tmp_path / "damaged", {victim: _bogus_huffman_table})
    straight = ThreeViewLoader(damaged, sampler, ("image", "aug1"), AUG, seed=4, threads=2)
    n = sampler.steps_per_epoch + 3  # into the next epoch, where the victim is read again
    batches, state = [], None
    for step in range(n):
        batches.append({k: v.clone() for k, v in next(straight).items()})
        if step == 2:
            state = straight.state()
    assert straight.corrupt == {victim: "undecodable"} and state["undecodable"] == [victim]
    restored = ThreeViewLoader(damaged, sampler, ("image", "aug1"), AUG, seed=4, threads=2, start_step=3, state=state)
    for step in range(3, n):
        got = next(restored)
        for key, want in batches[step].items():
            assert torch.equal(got[key], want), (step, key)
    assert restored.origin == straight.origin  # no second rebuild
