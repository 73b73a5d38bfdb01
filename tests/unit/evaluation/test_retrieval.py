"""Image-text recall@K: hand-computed cases, tie handling, chunking parity against a plain oracle."""
import math

import pytest
import torch
import torch.nn.functional as F

from evaluation import retrieval
from evaluation.retrieval import recall_at_k


def _captioned(n_img: int, per_image: list[int], d: int = 32, noise: float = 1e-3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, d, generator=g)  # (n_img, d): random directions, far apart in d=32
    t2i = torch.repeat_interleave(torch.arange(n_img), torch.tensor(per_image))  # (n_txt,)
    txt = img[t2i] + noise * torch.randn(len(t2i), d, generator=g)  # (n_txt, d)
    return img, txt, t2i


def _oracle(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks) -> dict:
    """The usual benchmark loop over the full matrix with topk; equal to recall_at_k when no scores tie."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # (n_img, n_txt)
    out = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        top_t = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (n_img, k)
        hits = [bool((t2i[top_t[i]] == i).any()) for i in range(sim.shape[0]) if (t2i == i).any()]
        out["image_to_text"][f"R@{k}"] = sum(hits) / len(hits)
        top_i = sim.T.topk(min(k, sim.shape[0]), dim=1).indices  # (n_txt, k)
        out["text_to_image"][f"R@{k}"] = float((top_i == t2i[:, None]).any(dim=1).double().mean())
    return out


def test_captions_next_to_their_images_are_all_found() -> None:
    img, txt, t2i = _captioned(50, [1 + i % 5 for i in range(50)])
    r = recall_at_k(img, txt, t2i)
    assert r["image_to_text"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert r["text_to_image"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert (r["images"], r["captions"], r["images_without_captions"]) == (50, len(t2i), 0)


def test_shuffled_captions_score_near_chance() -> None:
    n = 200
    img, txt, t2i = _captioned(n, [1] * n)
    wrong = t2i[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    r = recall_at_k(img, txt, wrong)
    # Only fixed points of the permutation are found at R@1: about one caption, chance 1/n.
    assert r["text_to_image"]["R@1"] < 0.03
    assert r["image_to_text"]["R@1"] < 0.03
    assert r["text_to_image"]["R@10"] < 0.15  # chance 10/n = 0.05


def test_an_image_is_found_if_any_of_its_captions_is_nearest() -> None:
    img = torch.eye(3)  # (3, 3): three orthogonal images
    txt = torch.tensor(
        [[0.6, 0.8, 0.0], [0.6, 0.0, 0.8], [1.0, 0.05, 0.0], [0.9, 0.436, 0.0], [0.0, 0.0, 1.0]]
    )  # (5, 3)
    t2i = torch.tensor([0, 0, 0, 1, 2])
    # Image 0's captions score 0.6, 0.6 and 0.999 against it; image 1's caption 3 scores 0.9, above the
    # first two. Only the third caption outranks it, and that is enough. Image 1 (own 0.436, caption
    # 0 at 0.8) misses; image 2 (own 1.0) is found.
    r = recall_at_k(img, txt, t2i, ks=(1, 2))
    assert r["image_to_text"] == {"R@1": 2 / 3, "R@2": 1.0}
    without_third = recall_at_k(img, txt[[0, 1, 3, 4]], t2i[[0, 1, 3, 4]], ks=(1, 2))
    assert without_third["image_to_text"] == {"R@1": 1 / 3, "R@2": 1.0}  # now image 0 misses too
    # text -> image: only captions 2 and 4 have their image nearest.
    assert r["text_to_image"]["R@1"] == 2 / 5


def test_hand_computed_three_images_five_captions() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # (3, 2)
    txt = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2], [0.0, -1.0], [-1.0, -0.5]])  # (5, 2), normalised inside
    t2i = torch.tensor([0, 0, 1, 1, 2])
    # text -> image ranks (other images scoring >= own): t0 0, t1 1 (image 1 nearer), t2 1 (image 2),
    # t3 2 (scores 0, -1, 0 for images 0, 1, 2: its own image is last), t4 0.
    # image -> text ranks (other images' captions scoring >= best own caption):
    # image 0: best t0 0.995, nothing above: 0. image 1: best t2 0.196, t1 0.995 above: 1.
    # image 2: own t4 0.894, t2 0.981 above: 1.
    r = recall_at_k(img, txt, t2i, ks=(1, 2, 3, 10))
    assert r["text_to_image"] == {"R@1": 2 / 5, "R@2": 4 / 5, "R@3": 1.0, "R@10": 1.0}
    assert r["image_to_text"] == {"R@1": 1 / 3, "R@2": 1.0, "R@3": 1.0, "R@10": 1.0}
    assert (r["images"], r["captions"]) == (3, 5)


def test_ties_count_against_the_positive() -> None:
    img = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # images 0 and 1 have the same direction
    txt = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    t2i = torch.tensor([0, 1, 2])
    r = recall_at_k(img, txt, t2i, ks=(1, 2))
    # Captions 0 and 1 tie between images 0 and 1: each ranks second. Caption 2 is found.
    assert r["text_to_image"] == {"R@1": 1 / 3, "R@2": 1.0}
    assert r["image_to_text"] == {"R@1": 1 / 3, "R@2": 1.0}


def test_a_collapsed_encoder_scores_zero_not_one() -> None:
    n = 20
    r = recall_at_k(torch.ones(n, 8), torch.ones(2 * n, 8), torch.arange(n).repeat(2), ks=(1, 5, 20, 100))
    # Every candidate ties: an image's rank is the 2(n-1) other captions, a caption's the n-1 other images.
    assert r["text_to_image"] == {"R@1": 0.0, "R@5": 0.0, "R@20": 1.0, "R@100": 1.0}
    assert r["image_to_text"] == {"R@1": 0.0, "R@5": 0.0, "R@20": 0.0, "R@100": 1.0}


def test_an_image_without_captions_is_a_distractor_only() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # image 2 has no caption
    txt = torch.tensor([[0.9, 0.45], [0.0, 1.0]])  # caption 0 lies nearer image 2 than its own image 0
    t2i = torch.tensor([0, 1])
    r = recall_at_k(img, txt, t2i, ks=(1, 2))
    assert r["images_without_captions"] == 1
    assert r["text_to_image"] == {"R@1": 0.5, "R@2": 1.0}  # image 2 beats image 0 for caption 0
    assert r["image_to_text"] == {"R@1": 1.0, "R@2": 1.0}  # over images 0 and 1 only


def test_chunking_matches_one_block_and_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    img = torch.randn(37, 16, generator=g)  # (37, 16)
    t2i = torch.randint(0, 37, (90,), generator=g)  # some images get no caption
    txt = img[t2i] + 1.5 * torch.randn(90, 16, generator=g)  # (90, 16): noisy, so recalls are neither 0 nor 1
    ks = (1, 5, 10, 50)
    whole = recall_at_k(img, txt, t2i, ks)
    monkeypatch.setattr(retrieval, "CHUNK_ROWS", 2)
    chunked = recall_at_k(img, txt, t2i, ks)
    assert chunked == whole
    oracle = _oracle(img, txt, t2i, ks)
    for direction in ("image_to_text", "text_to_image"):
        for key, value in oracle[direction].items():
            assert math.isclose(whole[direction][key], value), (direction, key)
    assert 0.0 < whole["text_to_image"]["R@1"] < 1.0
    assert whole["images_without_captions"] == int((torch.bincount(t2i, minlength=37) == 0).sum())


@pytest.mark.parametrize(
    "img, txt, t2i, ks, match",
    [
        (torch.randn(3, 4), torch.randn(5, 6), torch.zeros(5, dtype=torch.int64), (1,), "widths differ"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]), (1,), "must lie in"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, -1, 2, 0]), (1,), "must lie in"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.int64), (1,), "one image per caption"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5), (1,), "integer"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), (0,), "positive ints"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), (), "positive ints"),
        (torch.randn(3), torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), (1,), r"\[n, d\]"),
        (torch.full((3, 4), float("nan")), torch.randn(5, 4), torch.zeros(5, dtype=torch.int64), (1,), "NaN"),
    ],
)
def test_bad_input_is_refused(img, txt, t2i, ks, match) -> None:
    with pytest.raises(ValueError, match=match):
        recall_at_k(img, txt, t2i, ks)
