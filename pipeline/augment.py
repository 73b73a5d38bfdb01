"""The three-view DALI graph: one decode per image, the CLIP crop and two SimCLR views.

Parameters follow SLIP's reference transforms (torchvision): CLIP crop = RandomResizedCrop
(scale 0.5-1); SimCLR views = RandomResizedCrop (0.08-1), colour jitter 0.4/0.4/0.4/0.1 with
p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5, horizontal flip; all normalised
with the ImageNet mean and std. Random choices are DALI conditionals, so an augmentation that
is not drawn for a sample is not computed for it.

Known difference from torchvision's ColorJitter: DALI's color_twist applies brightness,
contrast, saturation and hue in one fixed order (torchvision shuffles the order per sample)
and rotates hue in YIQ rather than HSV. The ranges are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

VIEWS = ("image", "aug1", "aug2")  # the batch contract's image outputs, in pipeline order


@dataclass
class AugmentConfig:
    image_size: int = 224
    clip_scale: tuple[float, float] = (0.5, 1.0)
    ssl_scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output view: scale with image_size
    flip_p: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"augment.image_size must be positive, got {self.image_size}")
        for name in ("clip_scale", "ssl_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"augment.{name} must be an increasing positive range, got {(lo, hi)}")
        if self.clip_scale[1] > 1 or self.ssl_scale[1] > 1:
            raise ValueError("augment.clip_scale and augment.ssl_scale are fractions of the area, at most 1")
        for name in ("jitter_p", "grayscale_p", "blur_p", "flip_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("augment.std must be positive")


def normalize(view: DataNode, cfg: AugmentConfig, mirror: DataNode | int = 0, crop: tuple[int, int] | None = None) -> DataNode:
    """uint8 HWC -> float32 CHW with the mean/std of `cfg`, optionally flipped and center-cropped."""
    return fn.crop_mirror_normalize(
        view,
        mirror=mirror,
        crop=crop,
        mean=[255 * m for m in cfg.mean],
        std=[255 * s for s in cfg.std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def _clip_view(decoded: DataNode, cfg: AugmentConfig) -> DataNode:
    view = fn.random_resized_crop(
        decoded, size=[cfg.image_size] * 2, random_area=list(cfg.clip_scale), random_aspect_ratio=list(cfg.ratio)
    )
    return normalize(view, cfg)


def _ssl_view(decoded: DataNode, cfg: AugmentConfig) -> DataNode:
    view = fn.random_resized_crop(
        decoded, size=[cfg.image_size] * 2, random_area=list(cfg.ssl_scale), random_aspect_ratio=list(cfg.ratio)
    )
    brightness, contrast, saturation, hue = cfg.jitter
    if fn.random.coin_flip(probability=cfg.jitter_p):
        # torchvision's hue factor is a fraction of the colour wheel; DALI's is in degrees.
        view = fn.color_twist(
            view,
            brightness=fn.random.uniform(range=[1 - brightness, 1 + brightness]),
            contrast=fn.random.uniform(range=[1 - contrast, 1 + contrast]),
            saturation=fn.random.uniform(range=[1 - saturation, 1 + saturation]),
            hue=fn.random.uniform(range=[-360 * hue, 360 * hue]),
        )
    if fn.random.coin_flip(probability=cfg.grayscale_p):
        # Zero saturation keeps the luma (0.299 R + 0.587 G + 0.114 B) in all three channels.
        view = fn.color_twist(view, saturation=0.0)
    if fn.random.coin_flip(probability=cfg.blur_p):
        view = fn.gaussian_blur(view, sigma=fn.random.uniform(range=list(cfg.blur_sigma)))
    return normalize(view, cfg, mirror=fn.random.coin_flip(probability=cfg.flip_p))


def three_view_pipeline(
    source: Callable,
    views: tuple[str, ...],
    cfg: AugmentConfig,
    *,
    batch_size: int,
    num_threads: int,
    device: str = "cpu",
    device_id: int = 0,
    seed: int = 0,
    prefetch: int = 2,
) -> Pipeline:
    """A built pipeline whose outputs are (index, *views) for the views asked for.

    `source(batch_info)` returns (list of encoded JPEG arrays, list of int64 [1] indices);
    the index rides through DALI so that host-side fields stay aligned with prefetching.
    """
    unknown = set(views) - set(VIEWS)
    if unknown or not views:
        raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {views}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got '{device}'")

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, index = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True)
        decoded = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        built = {
            "image": (lambda: _clip_view(decoded, cfg)),
            "aug1": (lambda: _ssl_view(decoded, cfg)),
            "aug2": (lambda: _ssl_view(decoded, cfg)),
        }
        return (index, *(built[v]() for v in VIEWS if v in views))

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,  # each rank decodes on its own GPU
        seed=seed,
        prefetch_queue_depth=prefetch,
    )
    pipe.build()
    return pipe
