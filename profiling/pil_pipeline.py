"""The SLIP reference's input pipeline, restated with PIL + torchvision on a torch DataLoader:
the baseline `slip profile pipeline` and `slip profile step` (`data.loader=pil`) measure against.

Same transforms and parameters as SLIP's main.py / utils.GaussianBlur, reading the same
converted samples as slipstream's loader, so the two can be measured side by side.
"""
from __future__ import annotations

import io
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pipeline.augment_config import VIEWS, AugmentConfig, ssl_side
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler


class PILGaussianBlur:
    """SLIP's utils.GaussianBlur: PIL's blur with a radius drawn uniformly from `sigma`."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def pil_transforms(cfg: AugmentConfig) -> dict[str, transforms.Compose]:
    normalize = transforms.Normalize(mean=list(cfg.mean), std=list(cfg.std))
    size, ssl_size = cfg.image_size, ssl_side(cfg)
    blur = tuple(s * ssl_size / size for s in cfg.blur_sigma)  # blur_sigma is in pixels of an image_size view
    clip = transforms.Compose(
        [transforms.RandomResizedCrop(size, scale=cfg.clip_scale, ratio=cfg.ratio), transforms.ToTensor(), normalize]
    )
    ssl = transforms.Compose(
        [
            transforms.RandomResizedCrop(ssl_size, scale=cfg.ssl_scale, ratio=cfg.ratio),
            transforms.RandomApply([transforms.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
            transforms.RandomGrayscale(p=cfg.grayscale_p),
            transforms.RandomApply([PILGaussianBlur(blur)], p=cfg.blur_p),
            transforms.RandomHorizontalFlip(p=cfg.flip_p),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return {"image": clip, "aug1": ssl, "aug2": ssl}


class PILDataset(Dataset):
    """One sample: PIL decode once, then each view's torchvision transform; the first caption."""

    def __init__(self, dataset: BetonDataset, views: tuple[str, ...], cfg: AugmentConfig) -> None:
        self.dataset = dataset
        self.views = tuple(v for v in VIEWS if v in views)
        self.transforms = pil_transforms(cfg)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with Image.open(io.BytesIO(self.dataset.jpeg(index).tobytes())) as image:
            image = image.convert("RGB")
        out = {view: self.transforms[view](image) for view in self.views}  # each (3, S, S)
        out["text"] = torch.from_numpy(self.dataset.tokens(index)[0].astype(np.int64))  # (77,)
        out["index"] = torch.tensor(index)
        return out


def pil_loader(
    dataset: BetonDataset, views: tuple[str, ...], cfg: AugmentConfig, *, batch_size: int, workers: int, seed: int = 0
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        PILDataset(dataset, views, cfg),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=generator,
    )


class _StepBatches(torch.utils.data.Sampler):
    """The sample indices of global steps start, start+1, ... as slipstream's loader draws them."""

    def __init__(self, sampler: EpochSampler, start_step: int) -> None:
        self.sampler, self.start_step = sampler, start_step

    def __iter__(self):
        step = self.start_step
        while True:
            yield [int(i) for i in self.sampler.indices(step)]
            step += 1


def pil_batches(
    dataset: BetonDataset, views: tuple[str, ...], cfg: AugmentConfig, sampler: EpochSampler, *, workers: int, start_step: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """The SLIP reference's pipeline over the same samples, step for step, as slipstream's training
    loader: for `slip profile step` comparisons on the same data. Not resumable: it keeps no state."""
    loader = DataLoader(
        PILDataset(dataset, views, cfg), batch_sampler=_StepBatches(sampler, start_step), num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip
    return iter(loader)
