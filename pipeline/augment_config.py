"""What the views are, apart from the DALI graph that makes them: their names in the batch
contract, the augmentation's settings, and the side of each view at each epoch. Importing
this needs no DALI, so the config tree (and a node that has no DALI, training on the
synthetic loader) can use it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction

VIEWS = ("image", "aug1", "aug2")  # the batch contract's image outputs, in pipeline order


@dataclass
class AugmentConfig:
    image_size: int = 224  # the CLIP view's side, and the evaluation's
    clip_scale: tuple[float, float] = (0.5, 1.0)
    ssl_scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of a view of image_size; smaller views scale it
    flip_p: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    ssl_image_size: int = 0  # the two SimCLR views' side; 0: image_size
    # Progressive resolution (FFCV's progressive resizing) of the CLIP view: 0 is off; else its
    # side at the start, growing linearly to image_size over the epochs resolution_ramp.
    resolution_start: int = 0
    resolution_ramp: tuple[float, float] = (0.0, 0.0)  # first and last epoch of the ramp
    resolution_step: int = 32  # the scheduled sides are rounded down to a multiple of this

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
        if any(x < 0 for x in self.jitter) or self.jitter[3] > 0.5:
            raise ValueError(f"augment.jitter is (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5, got {self.jitter}")
        if not 0 <= self.ssl_image_size <= self.image_size:
            raise ValueError(f"augment.ssl_image_size must be 0 (the image_size) or a side of at most image_size ({self.image_size}), got {self.ssl_image_size}")  # fmt: skip
        self._check_resolution()

    def _check_resolution(self) -> None:
        step, start, (first, last) = self.resolution_step, self.resolution_start, self.resolution_ramp
        if step <= 0:
            raise ValueError(f"augment.resolution_step must be positive, got {step}")
        if not 0 <= first <= last:
            raise ValueError(f"augment.resolution_ramp is [first, last] epoch with 0 <= first <= last, got {[first, last]}")
        if start == 0:
            return
        if not 0 < start < self.image_size:
            raise ValueError(f"augment.resolution_start must be 0 (off) or a side below image_size ({self.image_size}), got {start}")
        if start % step or self.image_size % step:
            raise ValueError(f"augment.resolution_start ({start}) and augment.image_size ({self.image_size}) must be multiples of augment.resolution_step ({step})")  # fmt: skip
        if self.ssl_image_size % step:
            raise ValueError(f"augment.ssl_image_size ({self.ssl_image_size}) must be a multiple of augment.resolution_step ({step}) when resolution_start is set")  # fmt: skip
        if not last > first:
            raise ValueError(f"augment.resolution_ramp must have last > first when resolution_start is set, got {[first, last]}")


def ssl_side(cfg: AugmentConfig) -> int:
    """The SimCLR views' side in pixels at the config's own sizes."""
    return cfg.ssl_image_size or cfg.image_size


def view_sizes(cfg: AugmentConfig, epoch: int) -> tuple[int, int]:
    """(CLIP view side, SimCLR views' side) for the batches of `epoch`.

    Without progressive resolution, (image_size, ssl_image_size or image_size) at every epoch.
    With it, the CLIP side is resolution_start until the ramp's first epoch, image_size from its
    last, and in between start + (image_size - start) * (epoch - first) / (last - first) rounded
    down to a multiple of resolution_step. The SimCLR side keeps its ratio to the CLIP side:
    (ssl_image_size or image_size) * clip / image_size, rounded down to a multiple of
    resolution_step and at least one step. Exact rational arithmetic, so a side on a multiple
    is never rounded to the one below by a float's error.
    """
    base = ssl_side(cfg)
    if cfg.resolution_start == 0:
        return cfg.image_size, base
    start, end, step = cfg.resolution_start, cfg.image_size, cfg.resolution_step
    first, last = (Fraction(x) for x in cfg.resolution_ramp)
    t = min(max((Fraction(epoch) - first) / (last - first), Fraction(0)), Fraction(1))
    clip = max(start, int(start + (end - start) * t) // step * step)
    ssl = max(step, base * clip // (end * step) * step)
    return clip, ssl


def at_sizes(cfg: AugmentConfig, clip: int, ssl: int) -> AugmentConfig:
    """`cfg` with fixed views of clip x clip and ssl x ssl pixels and no schedule: what the
    pipeline for one stretch of the progressive schedule is built from. Its blur_sigma is
    rescaled so that it still means pixels of a view of `cfg`'s own image_size: a SimCLR view
    is blurred by the same fraction of its side whatever its size at the time."""
    blur = cfg.blur_sigma if clip == cfg.image_size else tuple(s * clip / cfg.image_size for s in cfg.blur_sigma)
    return dataclasses.replace(
        cfg, image_size=clip, ssl_image_size=ssl, blur_sigma=blur, resolution_start=0, resolution_ramp=(0.0, 0.0)
    )
