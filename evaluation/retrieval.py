"""Image-text retrieval recall@K, as CLIP and SLIP report it on captioned sets (COCO, Flickr30k).

Each image has one or more captions; each caption belongs to exactly one image (``text_to_image``).

- text -> image: a caption is found at K if its image ranks in the top K of all images.
- image -> text: an image is found at K if ANY of its captions ranks in the top K of all captions.

Ranks and ties. A query's rank is the number of NEGATIVE candidates scoring >= its best positive
(for image -> text the best of its captions; its other captions never count against it); it is
found at K when that rank is < K. So ties are pessimistic: a negative that ties the positive ranks
ahead of it. This is deterministic (no dependence on the order ``topk`` returns equal scores in)
and it cannot flatter a degenerate model: an encoder that maps everything to one vector ties every
candidate and scores 0 (below the largest K), where a tie-optimistic count would give it 1.0.
K larger than the number of candidates is in effect clamped: every query is found (the key keeps
the K asked for).

Similarities are cosine in float32, computed chunk by chunk over query rows, so the full
[n_img, n_txt] matrix never exists (COCO's 5k x 25k would be 500 MB): each chunk is at most
``CHUNK_ROWS`` x the number of candidates.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.encoder import Encoder, dali_device
from evaluation.features import image_features, require_images, require_text, text_features
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import Skipped, iter_beton
from pipeline.reader import BetonDataset

# Query rows per similarity block; 1024 rows x 25k COCO captions x 4 bytes is about 100 MB.
CHUNK_ROWS = 1024


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int]) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(
            f"embeddings must be [n, d]: image_emb {list(image_emb.shape)}, text_emb {list(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding widths differ: images d={image_emb.shape[1]}, captions d={text_emb.shape[1]}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError(f"need at least one image and one caption, got {image_emb.shape[0]} and {text_emb.shape[0]}")
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinity")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"text_to_image: expected shape [{text_emb.shape[0]}] (one image per caption), got {list(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype.is_complex or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image: expected an integer tensor, got {text_to_image.dtype}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= image_emb.shape[0]:
        raise ValueError(f"text_to_image: indices must lie in [0, {image_emb.shape[0]}), got [{lo}, {hi}]")
    try:
        ok = len(ks) > 0 and all(not isinstance(k, bool) and operator.index(k) >= 1 for k in ks)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")


def _text_to_image_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> torch.Tensor:
    """[n_txt] int64: per caption, the number of other images scoring >= its own image."""
    chunk = CHUNK_ROWS  # read at call time so tests can shrink it
    ranks = []
    for start in range(0, txt.shape[0], chunk):
        sim = txt[start : start + chunk] @ img.T  # (c, n_img)
        own = t2i[start : start + chunk]  # (c,)
        pos = sim.gather(1, own[:, None])  # (c, 1): taken from the same matrix, so it ties with itself exactly
        ranks.append((sim >= pos).sum(dim=1) - 1)  # minus the positive itself
    return torch.cat(ranks)


def _image_to_text_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> torch.Tensor:
    """[n_img] int64: per image, the number of other images' captions scoring >= its best caption;
    -1 for an image without captions."""
    chunk = CHUNK_ROWS
    ranks = []
    for start in range(0, img.shape[0], chunk):
        sim = img[start : start + chunk] @ txt.T  # (c, n_txt)
        ids = torch.arange(start, start + sim.shape[0], device=img.device)  # (c,)
        mine = t2i[None, :] == ids[:, None]  # (c, n_txt): this image's captions
        best = sim.masked_fill(~mine, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        rank = ((sim >= best) & ~mine).sum(dim=1)  # (c,)
        ranks.append(torch.where(mine.any(dim=1), rank, torch.full_like(rank, -1)))
    return torch.cat(ranks)


@torch.no_grad()
def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Recall@K both ways.

    image_emb: [n_img, d], text_emb: [n_txt, d] (normalised here, so raw tower outputs are fine);
    text_to_image: [n_txt] int64, the image each caption describes.

    An image with no caption is still a candidate (a distractor) for text -> image, but has nothing
    to find for image -> text: it is left out of that direction's denominator and counted in
    "images_without_captions".

    Returns {"image_to_text": {"R@K": fraction}, "text_to_image": {"R@K": fraction},
    "images": n_img, "captions": n_txt, "images_without_captions": count}.
    """
    _check(image_emb, text_emb, text_to_image, ks)
    device = image_emb.device
    img = F.normalize(image_emb.detach().float(), dim=-1)  # (n_img, d)
    txt = F.normalize(text_emb.detach().to(device=device, dtype=torch.float32), dim=-1)  # (n_txt, d)
    t2i = text_to_image.detach().to(device=device, dtype=torch.int64)  # (n_txt,)

    t_ranks = _text_to_image_ranks(img, txt, t2i)  # (n_txt,)
    i_ranks = _image_to_text_ranks(img, txt, t2i)  # (n_img,)
    captioned = i_ranks >= 0
    i_ranks = i_ranks[captioned]  # (n_captioned,); not empty, since every caption has an image

    ks = [operator.index(k) for k in ks]  # numpy ints too, printed as plain ints in the keys
    return {
        "image_to_text": {f"R@{k}": float((i_ranks < k).double().mean()) for k in ks},
        "text_to_image": {f"R@{k}": float((t_ranks < k).double().mean()) for k in ks},
        "images": int(img.shape[0]),
        "captions": int(txt.shape[0]),
        "images_without_captions": int((~captioned).sum()),
    }


def eval_retrieval(
    encoder: Encoder,
    augment: AugmentConfig,
    data: str | Path,
    *,
    batch_size: int = 256,
    threads: int = 2,
) -> dict:
    """Image-to-text and text-to-image recall@1/5/10 over every caption of a converted dataset.

    An image whose stored JPEG cannot be decoded is left out with its captions, so every
    remaining caption still points at its own image; "skipped" counts them by reason (`Skipped.report`)."""
    require_text(encoder, "retrieval")
    dataset = BetonDataset(data)
    rows, owner = [], []
    for i in range(len(dataset)):
        k = int(dataset.n_captions[i])
        rows.append(torch.from_numpy(dataset.tokens(i)[:k].astype("int64")))  # (k, 77)
        owner += [i] * k
    texts = text_features(encoder, torch.cat(rows), batch_size=batch_size)  # first: a text-less model fails before any decode
    skipped = Skipped()
    batches = iter_beton(dataset, augment, batch_size=batch_size, threads=threads, skipped=skipped, **dali_device(encoder))
    images, order = image_features(encoder, batches, -(-len(dataset) // batch_size), "retrieval: images")
    require_images(len(images), dataset.directory, skipped)
    position = torch.full((len(dataset),), -1, dtype=torch.int64)  # sample index -> row of `images`; -1: skipped
    position[order] = torch.arange(len(order))
    t2i = position[torch.tensor(owner, dtype=torch.int64)]  # (n_txt,)
    kept = t2i >= 0  # the captions of images that were decoded
    return {**recall_at_k(images, texts[kept.to(texts.device)], t2i[kept]), **skipped.report()}
