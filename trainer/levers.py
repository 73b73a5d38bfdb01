"""The compute levers of a recipe as pure functions of the global step: patch dropout (FLIP),
with its unmasked tuning at the end, and the views' sizes (progressive resolution, light SSL
views). Being functions of the step alone, they need no state of their own to resume exactly."""
from __future__ import annotations

from pipeline.augment_config import view_sizes
from trainer.config import Config
from trainer.models import SIZES


def patch_dropout_at(cfg: Config, step: int, total: int) -> tuple[float, float]:
    """(CLIP view, SimCLR views) fractions of patch tokens dropped at `step` of `total`: none in
    the last `schedule.unmasked_steps`."""
    m = cfg.model
    if step >= total - cfg.schedule.unmasked_steps:
        return 0.0, 0.0
    return m.patch_dropout, m.patch_dropout if m.ssl_patch_dropout < 0 else m.ssl_patch_dropout


def sizes_at(cfg: Config, step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(CLIP view, SimCLR views) sides in pixels for the batch of `step`; they change at epoch starts."""
    return view_sizes(cfg.augment, step // max(1, steps_per_epoch))


def varying_sizes(cfg: Config) -> bool:
    """Whether training views differ from `augment.image_size`: the ViT then resamples its
    position embedding to each input's grid (timm's dynamic_img_size)."""
    a = cfg.augment
    return a.resolution_start > 0 or a.ssl_image_size not in (0, a.image_size)


def check_levers(cfg: Config) -> None:
    """Sizes the ViT cannot take, refused before anything is built."""
    a = cfg.augment
    if cfg.model.size not in SIZES:  # named in its own error, by the config's name check
        return
    patch = SIZES[cfg.model.size].patch_size
    if a.ssl_image_size and a.ssl_image_size % patch:
        raise ValueError(f"config: augment.ssl_image_size {a.ssl_image_size} is not a multiple of {cfg.model.size}'s patch size {patch}")
    if a.resolution_start > 0 and a.resolution_step % patch:
        raise ValueError(f"config: augment.resolution_step {a.resolution_step} is not a multiple of {cfg.model.size}'s patch size {patch}")
