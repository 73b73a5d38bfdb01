"""Views of their own sizes: the SimCLR views' side, progressive resolution's schedule of sides,
and the graphs (CPU and GPU) and the synthetic loader that make views of those sides."""
from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import augment_kernels
from pipeline.augment import three_view_graph, three_view_pipeline
from pipeline.augment_config import AugmentConfig, at_sizes, view_sizes
from pipeline.synthetic import POOL, SyntheticBatches

RAMP = AugmentConfig(image_size=224, ssl_image_size=96, resolution_start=160, resolution_ramp=(2, 6), resolution_step=32)


def test_the_clip_side_ramps_linearly_rounded_down_and_the_ssl_side_keeps_its_ratio() -> None:
    # Epoch e in the ramp: 160 + 64 (e - 2) / 4, down to a multiple of 32; SimCLR: 96 * clip / 224, down to 32.
    want = {0: (160, 64), 2: (160, 64), 3: (160, 64), 4: (192, 64), 5: (192, 64), 6: (224, 96), 40: (224, 96)}
    assert {e: view_sizes(RAMP, e) for e in want} == want
    same = AugmentConfig(image_size=224, resolution_start=160, resolution_ramp=(2, 6), resolution_step=32)
    assert [view_sizes(same, e) for e in (0, 4, 6)] == [(160, 160), (192, 192), (224, 224)]  # ssl 0: the CLIP side


def test_a_side_on_a_multiple_is_not_rounded_below_it_by_float_error() -> None:
    # 96 + 96 * 1/3 is 128 exactly; in floats it is 127.99..., which would round down to 96.
    cfg = AugmentConfig(image_size=192, resolution_start=96, resolution_ramp=(0, 3), resolution_step=32)
    assert [view_sizes(cfg, e)[0] for e in range(5)] == [96, 128, 160, 192, 192]
    fractional = AugmentConfig(image_size=64, resolution_start=32, resolution_ramp=(0.5, 2.5), resolution_step=8)
    assert [view_sizes(fractional, e)[0] for e in range(4)] == [32, 40, 56, 64]  # 32 + 32 * (e - 0.5) / 2


def test_the_ssl_side_never_falls_below_one_step() -> None:
    cfg = AugmentConfig(image_size=64, ssl_image_size=16, resolution_start=16, resolution_ramp=(0, 4), resolution_step=16)
    assert view_sizes(cfg, 0) == (16, 16)  # 16 * 16 / 64 = 4, held at one step
    assert view_sizes(cfg, 4) == (64, 16)


def test_without_a_schedule_the_sides_are_the_configs_at_every_epoch() -> None:
    assert view_sizes(AugmentConfig(image_size=64), 7) == (64, 64)
    assert view_sizes(AugmentConfig(image_size=64, ssl_image_size=40), 0) == (64, 40)  # no rounding when off


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"ssl_image_size": 65}, "augment.ssl_image_size"),
        ({"ssl_image_size": -1}, "augment.ssl_image_size"),
        ({"resolution_step": 0}, "augment.resolution_step"),
        ({"resolution_ramp": (3, 1)}, "augment.resolution_ramp"),
        ({"resolution_ramp": (-1, 1)}, "augment.resolution_ramp"),
        ({"resolution_start": 64, "resolution_ramp": (0, 2)}, "augment.resolution_start"),
        ({"resolution_start": 40, "resolution_ramp": (0, 2)}, "augment.resolution_start"),  # not a multiple of 32
        ({"resolution_start": 32, "resolution_ramp": (2, 2)}, "augment.resolution_ramp"),
        ({"resolution_start": 32, "resolution_ramp": (0, 2), "ssl_image_size": 48}, "augment.ssl_image_size"),
    ],
)
def test_bad_sizes_are_refused_naming_the_key(fields: dict, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)) as error:
        AugmentConfig(image_size=64, **fields)
    assert "\n" not in str(error.value)


def test_a_config_at_other_sides_keeps_the_blur_a_fraction_of_the_view() -> None:
    cfg = AugmentConfig(image_size=224, ssl_image_size=96, blur_sigma=(0.3, 1.7), resolution_start=128, resolution_ramp=(0, 4))
    small = at_sizes(cfg, 128, 64)
    assert (small.image_size, small.ssl_image_size, small.resolution_start) == (128, 64, 0)
    # The graph scales blur_sigma by ssl side / image_size: 64/128 of (0.3, 1.7) * 128/224, i.e. 64/224 of it.
    assert np.allclose(np.array(small.blur_sigma) * 64 / 128, np.array(cfg.blur_sigma) * 64 / 224)
    assert at_sizes(cfg, 224, 96).blur_sigma == cfg.blur_sigma


def _png(pixels: np.ndarray) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")  # lossless: the graph decodes exactly these pixels
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


def _pixels(view: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """A normalised CHW view back to uint8 HWC."""
    hwc = view.transpose(1, 2, 0) * (255 * np.array(cfg.std)) + 255 * np.array(cfg.mean)
    return np.round(hwc).astype(np.uint8)


@pytest.mark.slow  # compiles four kernels as DALI operators: about 15 s
def test_the_cpu_graph_makes_ssl_views_of_their_side_blurred_to_scale() -> None:
    # Whole-image crops, no jitter, no flip, always a pinned blur: each view has an oracle,
    # the compiled kernels called directly on the decoded pixels.
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    sigma = float(rng.uniform(0.8, 1.6))
    cfg = AugmentConfig(image_size=32, ssl_image_size=16, clip_scale=(1.0, 1.0), ssl_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                        jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=(sigma, sigma), flip_p=0.0)  # fmt: skip

    def source(info):
        return [_png(x) for x in images], np.arange(len(images), dtype=np.int64).reshape(-1, 1)

    pipe = three_view_pipeline(source, ("image", "aug1", "aug2"), cfg, batch_size=len(images), num_threads=1, device="cpu")
    _, image, aug1, aug2 = (np.array(out.as_tensor()) for out in pipe.run())
    pipe._shutdown()
    assert image.shape == (3, 3, 32, 32) and aug1.shape == aug2.shape == (3, 3, 16, 16)
    for i, pixels in enumerate(images):
        clip, ssl, blurred = np.empty((32, 32, 3), np.uint8), np.empty((16, 16, 3), np.uint8), np.empty((16, 16, 3), np.uint8)
        augment_kernels.resize_bilinear(clip, pixels)
        augment_kernels.resize_bilinear(ssl, pixels)
        augment_kernels.gaussian_blur(blurred, ssl, np.float32(sigma * 16 / 32))
        assert np.array_equal(_pixels(image[i], cfg), clip)
        assert np.array_equal(_pixels(aug1[i], cfg), blurred) and np.array_equal(_pixels(aug2[i], cfg), blurred)
        augment_kernels.gaussian_blur(blurred, ssl, np.float32(sigma))
        assert not np.array_equal(_pixels(aug1[i], cfg), blurred)  # the unscaled blur is another image


def _source(info):
    return [np.zeros(4, dtype=np.uint8)], np.zeros((1, 1), dtype=np.int64)


def _resize_sides(serialised: bytes) -> list[int]:
    # Each `size` argument's first element, as DALI's protobuf writes it: a one-byte varint for sides < 128.
    found = re.findall(rb"\n\x04size\x12\x05int64:.\n\telement 0\x12\x05int64 ([\x00-\x7f])", serialised, flags=re.DOTALL)
    return sorted(b[0] for b in found)


@pytest.mark.parametrize("ssl", [0, 32])
def test_the_gpu_graph_serialises_with_the_ssl_side_and_its_blur(ssl: int) -> None:
    cfg = AugmentConfig(image_size=64, ssl_image_size=ssl, blur_sigma=(0.3, 1.7))
    text = three_view_graph(_source, ("image", "aug1", "aug2"), cfg, batch_size=2, num_threads=1, device="gpu", device_id=None).serialize()
    side = ssl or 64
    assert _resize_sides(text) == sorted([64, side, side])
    for sigma in (0.3, 1.7):  # DALI's uniform range, float32 in the protobuf
        assert struct.pack("<f", sigma * side / 64) in text
    if ssl:
        assert struct.pack("<f", 1.7) not in text


def test_the_synthetic_loader_makes_ssl_views_of_their_side_and_follows_a_schedule() -> None:
    args = {"batch_size": 2, "image_size": 32, "text": False, "context_length": 8, "vocab_size": 100, "device": torch.device("cpu"), "seed": 1}
    batch = next(SyntheticBatches(("image", "aug1", "aug2"), ssl_image_size=16, **args))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["aug1"].shape == batch["aug2"].shape == (2, 3, 16, 16)

    def sizes(step: int) -> tuple[int, int]:
        return (16, 8) if step < 3 else (32, 16)

    loader = SyntheticBatches(("image", "aug1"), sizes=sizes, **args)
    batches = [next(loader) for _ in range(3 + POOL)]
    assert [(b["image"].shape[-1], b["aug1"].shape[-1]) for b in batches] == [sizes(s) for s in range(3 + POOL)]
    resumed = SyntheticBatches(("image", "aug1"), sizes=sizes, start_step=4, **args)
    assert torch.equal(next(resumed)["image"], batches[4]["image"])
