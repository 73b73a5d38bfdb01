"""The synthetic loader: the batch contract, made up front, deterministic, with captions a text tower can pool."""
import torch

from pipeline.synthetic import POOL, SyntheticBatches


def _loader(**kw) -> SyntheticBatches:
    args = {"batch_size": 4, "image_size": 32, "text": True, "context_length": 77, "vocab_size": 49408, "device": torch.device("cpu"), "seed": 3}
    return SyntheticBatches(("image", "aug1", "aug2"), **{**args, **kw})


def test_batches_follow_the_contract_and_captions_end_in_their_end_token() -> None:
    batch = next(_loader())
    assert set(batch) == {"image", "aug1", "aug2", "text", "index"}
    for view in ("image", "aug1", "aug2"):
        assert batch[view].shape == (4, 3, 32, 32) and batch[view].dtype == torch.float32
        assert 0.5 < float(batch[view].std()) < 1.5  # about what normalised images are
    text = batch["text"]
    assert text.shape == (4, 77) and text.dtype == torch.int64
    assert (text.argmax(dim=-1) == 76).all() and (text[:, :-1] < 49407).all() and (text >= 0).all()
    assert batch["index"].dtype == torch.int64 and len(set(batch["index"].tolist())) == 4


def test_the_objective_picks_the_outputs() -> None:
    clip = next(SyntheticBatches(("image",), batch_size=2, image_size=16, text=True, context_length=8, vocab_size=100, device=torch.device("cpu")))
    assert set(clip) == {"image", "text", "index"}
    simclr = next(SyntheticBatches(("aug1", "aug2"), batch_size=2, image_size=16, text=False, context_length=8, vocab_size=100, device=torch.device("cpu")))
    assert set(simclr) == {"aug1", "aug2", "index"}


def test_the_same_seed_gives_the_same_batches_and_another_seed_others() -> None:
    a, b, c = _loader(), _loader(), _loader(seed=4)
    for _ in range(POOL + 1):
        x, y, z = next(a), next(b), next(c)
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert not torch.equal(x["image"], z["image"])


def test_a_pool_of_batches_is_cycled_from_the_start_step() -> None:
    loader = _loader()
    batches = [next(loader) for _ in range(POOL * 2)]
    assert all(batches[i] is batches[i + POOL] for i in range(POOL))
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    assert loader.state() == {"step": POOL * 2}
    resumed = _loader(start_step=1)
    assert torch.equal(next(resumed)["image"], batches[1]["image"])
    ranks = [next(_loader(rank=r))["index"] for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())  # ranks never share indices
