"""What the views are, apart from the DALI graph that makes them: their names in the batch
contract, and the augmentation's settings. Importing this needs no DALI, so the config tree
(and a node that has no DALI, training on the synthetic loader) can use it."""
from __future__ import annotations

from dataclasses import dataclass

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
        if any(x < 0 for x in self.jitter) or self.jitter[3] > 0.5:
            raise ValueError(f"augment.jitter is (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5, got {self.jitter}")
