"""The SGD probe's training view: draws that are a pure function of (seed, epoch, sample), the
crop and flip as torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image, and the
GPU's way (window decode, then resize) cutting the same window."""
from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment_config import AugmentConfig
from pipeline.augment_kernels import crop_window
from pipeline.eval_view import Skipped
from pipeline.probe_view import PROBE_RATIO, PROBE_SCALE, iter_train_views, view_draws

AUG = AugmentConfig(image_size=32)


def _jpeg(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # Smooth colour fields (not noise), so that resizing filters differ only at the level of rounding.
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 6, size=3)
    img = (127.5 + 120 * np.sin(3 * xx[..., None] + 2 * yy[..., None] + phase)).astype(np.uint8)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _samples(rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list:
    return [(f"img{i}", i, functools.partial(_stored, _jpeg(rng, h, w))) for i, (h, w) in enumerate(sizes)]


def _stored(data: np.ndarray) -> tuple[np.ndarray, None]:
    return data, None


def test_the_draws_are_a_function_of_seed_epoch_and_sample_only() -> None:
    params, flip = view_draws(7, 3, [5, 9, 2])
    again, flip_again = view_draws(7, 3, [2, 5])  # another batch, another order
    assert np.array_equal(params[[2, 0]], again) and np.array_equal(flip[[2, 0]], flip_again)
    assert not np.array_equal(view_draws(7, 4, [5])[0], params[:1])  # a new epoch, a new view
    assert not np.array_equal(view_draws(8, 3, [5])[0], params[:1])  # a new seed too
    assert params.dtype == np.float32 and params.shape == (3, 44)
    assert (params[:, :40] >= 0).all() and (params[:, :40] < 1).all()
    assert np.allclose(params[:, 40:], [*PROBE_SCALE, *PROBE_RATIO])
    flips = view_draws(0, 0, range(2000))[1]
    assert set(np.unique(flips)) == {0, 1} and 0.45 < flips.mean() < 0.55


def test_the_cpu_view_is_torchvisions_crop_and_flip_of_the_draws() -> None:
    rng = np.random.default_rng(11)
    sizes = [(int(h), int(w)) for h, w in rng.integers(40, 120, size=(6, 2))]
    samples = _samples(rng, sizes)
    (views, keys), = iter_train_views([samples], AUG, seed=5, epoch=2, max_batch=6)
    assert views.shape == (6, 3, 32, 32) and keys.tolist() == list(range(6))
    params, flip = view_draws(5, 2, range(6))
    mean, std = torch.tensor(AUG.mean).view(3, 1, 1), torch.tensor(AUG.std).view(3, 1, 1)
    for i, (_, _, read) in enumerate(samples):
        img = Image.open(io.BytesIO(read()[0].tobytes())).convert("RGB")
        top, left, h, w = crop_window(img.height, img.width, params[i, :40], PROBE_SCALE, PROBE_RATIO)
        want = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR)
        if flip[i]:
            want = want.transpose(Image.FLIP_LEFT_RIGHT)
        want = torch.from_numpy(np.array(want)).permute(2, 0, 1).float()  # (3, 32, 32) levels
        got = (views[i] * std + mean) * 255  # back to levels
        # DALI's libjpeg-turbo and Pillow's libjpeg may round a decoded pixel apart by one level.
        diff = (got - want).abs()
        assert diff.max() < 1 + 1e-3 and (diff < 1e-3).float().mean() > 0.9, (i, diff.max(), (diff < 1e-3).float().mean())


def test_the_window_decode_cuts_the_kernels_window() -> None:
    rng = np.random.default_rng(12)
    samples = _samples(rng, [(int(h), int(w)) for h, w in rng.integers(48, 160, size=(8, 2))])
    kernel, _ = next(iter_train_views([samples], AUG, seed=1, epoch=0, max_batch=8, crop="kernel"))
    roi, _ = next(iter_train_views([samples], AUG, seed=1, epoch=0, max_batch=8, crop="roi"))
    other, _ = next(iter_train_views([samples], AUG, seed=1, epoch=1, max_batch=8, crop="roi"))
    # Two resize filters of one window differ by rounding; another epoch's window differs by far more.
    same = (kernel - roi).abs().mean(dim=(1, 2, 3))
    moved = (kernel - other).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.05, same
    assert (moved > 4 * same).sum() >= 6, (same, moved)


def test_a_bad_sample_is_skipped_and_a_batch_left_empty_still_yields() -> None:
    rng = np.random.default_rng(13)
    good = _samples(rng, [(50, 60), (70, 40)])
    bad = [("broken.jpg", 7, lambda: (None, "truncated"))]
    skipped = Skipped()
    out = list(iter_train_views([good, bad], AUG, seed=0, epoch=0, max_batch=2, skipped=skipped))
    assert [k.tolist() for _, k in out] == [[0, 1], []]
    assert out[1][0].numel() == 0 and skipped.by_reason == {"truncated": 1} and skipped.first == ["broken.jpg: truncated"]


def test_the_crop_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="roi"):
        next(iter_train_views([_samples(np.random.default_rng(1), [(40, 40)])], AUG, seed=0, epoch=0, max_batch=1, crop="cubic"))

