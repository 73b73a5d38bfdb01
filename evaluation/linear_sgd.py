"""The linear probe as SLIP's paper reports it: a linear head trained by SGD on a frozen trunk.

SLIP's linear classification numbers come from MoCo v3's linear script: the trunk frozen and in
eval mode, its pooled features (before any projection) fed to a linear head initialised
N(0, 0.01) with a zero bias, cross-entropy, SGD with momentum 0.9 and no weight decay, a learning
rate of 0.1 x batch / 256 decayed by a cosine over 90 epochs (set once per epoch), a global batch
of 1024, training views RandomResizedCrop + horizontal flip drawn anew every epoch, evaluation
views Resize(256) + CenterCrop(224). The augmentation makes every epoch's features new, so nothing
is cached: every epoch decodes, crops and encodes the whole training set (`pipeline/probe_view.py`).

Across processes (the deepspeed launcher or torchrun, with a process group initialised): each
global batch is split between the ranks, the head's gradient sums are all-reduced with the sample
count, and the step divides by the global count, so the step is the one-process step over the
whole batch. The reference reports the best of its validations every 10 epochs, chosen on the
validation set itself; this reports the head after the last epoch.
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from evaluation.encoder import ImageEncoder, dali_device, encoder_device, eval_mode, progress
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import LabelledImages, Skipped, checked, decode_batches, eval_graph, fed_reader, labelled_images
from pipeline.probe_view import iter_train_views


@dataclass(frozen=True)
class SgdProtocol:
    epochs: int = 90
    batch_size: int = 1024  # global, over all ranks
    base_lr: float = 0.1  # per 256 images of the global batch
    momentum: float = 0.9
    weight_decay: float = 0.0
    init_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and the probe's batch must be positive, got {self.epochs} and {self.batch_size}")
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ValueError(f"--lr must be positive, got {self.base_lr}")

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def lr_at(self, epoch: int) -> float:
        """The learning rate of an epoch: a half cosine from peak_lr, set at each epoch's start."""
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


def _ranks() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def eval_resize(size: int) -> int:
    """The shorter side before the center crop: 256 for 224, in proportion for other sizes."""
    return round(size * 256 / 224)


@torch.no_grad()
def _encode(encoder: ImageEncoder, images: torch.Tensor, chunk: int, device: torch.device) -> torch.Tensor:
    """Pooled features fp32 [b, d] of the frozen trunk, `chunk` images at a time (bf16 autocast on a GPU)."""
    out = []
    for i in range(0, len(images), chunk):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(encoder.encode_image(images[i : i + chunk].to(device, non_blocking=True)).float())  # (c, d)
    return torch.cat(out)


def _new_head(width: int, classes: int, protocol: SgdProtocol, device: torch.device) -> torch.nn.Linear:
    head = torch.nn.Linear(width, classes)
    gen = torch.Generator().manual_seed(protocol.seed)  # the same head on every rank, without a broadcast
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, width, generator=gen) * protocol.init_std)  # (C, d)
        head.bias.zero_()
    return head.to(device)


def train_head(
    encoder: ImageEncoder,
    augment: AugmentConfig,
    data: LabelledImages,
    protocol: SgdProtocol,
    *,
    chunk: int = 256,
    threads: int = 2,
    crop: str | None = None,
) -> tuple[torch.nn.Linear, dict]:
    """The head trained on `data` (one output per class) and {"train_loss": per epoch,
    "images_per_s", "n_train", "skipped", ...}."""
    rank, world = _ranks()
    samples, labels = data.samples()
    device = encoder_device(encoder)
    size = augment.image_size
    with torch.no_grad(), eval_mode(encoder):
        width = _encode(encoder, torch.zeros(1, 3, size, size), 1, device).shape[-1]  # the pooled feature's width
    head = _new_head(width, len(data.classes), protocol, device)
    opt = torch.optim.SGD(head.parameters(), lr=protocol.peak_lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)
    per_rank = -(-protocol.batch_size // world)
    skipped, losses, seen, busy = Skipped(), [], 0, 0.0
    steps = -(-len(samples) // protocol.batch_size)
    with eval_mode(encoder), progress(total=protocol.epochs * steps, desc="linear probe (sgd)", unit="step", quiet=rank != 0) as bar:
        for epoch in range(protocol.epochs):
            for group in opt.param_groups:
                group["lr"] = protocol.lr_at(epoch)
            order = np.random.default_rng([protocol.seed, epoch]).permutation(len(samples))  # the same on every rank
            mine = [np.array_split(order[i : i + protocol.batch_size], world)[rank] for i in range(0, len(order), protocol.batch_size)]
            batches = ([samples[k] for k in part] for part in mine)
            views = iter_train_views(batches, augment, seed=protocol.seed, epoch=epoch, max_batch=per_rank, threads=threads,
                                     skipped=skipped if epoch == 0 else Skipped(), crop=crop, **dali_device(encoder))  # fmt: skip
            loss_sum, count = 0.0, 0
            start = time.perf_counter()
            for _ in mine:  # one step per global batch on every rank, whatever happens on this one
                opt.zero_grad(set_to_none=False)
                loss, n_local, failure = _local_step(encoder, head, views, labels, chunk, width, device)
                # One all-reduce of the gradient sums, the count, the loss sum and the failures: the
                # step is the one-process step over the global batch, and a rank's error stops all.
                tail = torch.tensor([n_local, 0.0, float(failure is not None)], dtype=torch.float64, device=device)
                tail[1] = loss  # a device-to-device copy, no wait
                flat = _all_sum(torch.cat([head.weight.grad.flatten().double(), head.bias.grad.double(), tail]), world)
                if flat[-1] > 0:
                    raise failure or RuntimeError(f"linear probe (sgd): {int(flat[-1])} other rank(s) failed at epoch {epoch}; their error is theirs to report")
                n = int(flat[-3])
                if n > 0:  # a batch whose every image was skipped takes no step
                    head.weight.grad.copy_((flat[: head.weight.numel()] / n).view_as(head.weight))
                    head.bias.grad.copy_(flat[head.weight.numel() : -3] / n)
                    opt.step()
                loss_sum += float(flat[-2])
                count += n
                bar.update()
            busy += time.perf_counter() - start
            losses.append(loss_sum / max(1, count))
            seen += count
    return head, {"train_loss": losses, "images_per_s": seen / busy if busy else 0.0, "n_train": seen // protocol.epochs,
                  "skipped": _gathered(skipped, world)}  # fmt: skip


def _local_step(encoder: ImageEncoder, head: torch.nn.Linear, views: Iterator, labels: torch.Tensor, chunk: int, width: int,
                device: torch.device) -> tuple[torch.Tensor, int, Exception | None]:  # fmt: skip
    """This rank's share of one global batch: the summed cross-entropy (its gradient accumulated in
    the head), the images it held, and the error that stopped it, if any (its gradient then zero)."""
    try:
        images, keys = next(views, (None, None))
        if keys is None:  # a generator that raised once is finished: the error was reported then
            raise RuntimeError("the training views ended early")
        x = _encode(encoder, images, chunk, device) if len(keys) else torch.zeros(0, width, device=device)  # (b, d)
        loss = F.cross_entropy(head(x), labels[keys].to(device), reduction="sum")
        loss.backward()
        return loss.detach(), len(keys), None
    except (ValueError, OSError, RuntimeError) as err:
        head.weight.grad.zero_()
        head.bias.grad.zero_()
        return torch.zeros((), device=device), 0, err


def _gathered(skipped: Skipped, world: int) -> Skipped:
    """Every rank's skipped samples, on every rank."""
    if world == 1:
        return skipped
    parts: list = [None] * world
    dist.all_gather_object(parts, skipped)
    total = Skipped()
    for part in parts:
        total.extend(part)
    return total


@torch.no_grad()
def evaluate_head(encoder: ImageEncoder, head: torch.nn.Linear, augment: AugmentConfig, data: LabelledImages, *, chunk: int = 256,
                  threads: int = 2) -> dict:  # fmt: skip
    """Top-1 and top-5 of the head on the validation views (Resize(256) + CenterCrop(224), in proportion
    for other sizes), each rank scoring every world-th image; {"top1", "top5", "n_val", "skipped"}."""
    rank, world = _ranks()
    samples, labels = data.samples()
    device = encoder_device(encoder)
    mine = samples[rank::world]
    where = dali_device(encoder)
    graph = functools.partial(eval_graph, fed_reader, augment, chunk, threads, where["device"], where.get("device_id"), fed=True,
                              resize=eval_resize(augment.image_size))  # fmt: skip
    skipped = Skipped()
    batches = (checked(mine[i : i + chunk], skipped) for i in range(0, len(mine), chunk))
    hits = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, count
    with eval_mode(encoder):
        for images, keys in progress(decode_batches(batches, graph, where["device"], where.get("device_id", 0), skipped),
                                     total=-(-len(mine) // chunk), desc="linear probe (sgd): val", unit="batch", quiet=rank != 0):  # fmt: skip
            if not len(keys):
                continue
            logits = head(_encode(encoder, images, chunk, device))  # (b, C)
            y = labels[keys].to(device)  # (b,)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, 5)
            hits += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(dim=1).sum(), torch.tensor(len(y), device=device)]).double()
    top1, top5, n = _all_sum(hits, world).tolist()
    skipped = _gathered(skipped, world)
    if n == 0:
        raise ValueError(f"{data.path}: no image could be decoded ({', '.join(f'{k}={v}' for k, v in skipped.by_reason.items()) or 'no image files'})")
    return {"top1": top1 / n, "top5": top5 / n, "n_val": int(n), "skipped": skipped}


def linear_probe_sgd(
    encoder: ImageEncoder,
    augment: AugmentConfig,
    train: str | Path,
    val: str | Path,
    protocol: SgdProtocol = SgdProtocol(),
    *,
    batch_size: int = 256,
    threads: int = 2,
    crop: str | None = None,
) -> dict:
    """The paper's linear probe of the encoder's pooled features (pass `ImageTower(model.visual)`).
    `batch_size` is how many images the trunk encodes at once; the SGD batch is the protocol's.
    Returns {"top1", "top5", "train_loss" (per epoch), "images_per_s" (training views through
    decode, crop and trunk, all ranks), "world_size", the protocol's settings, "skipped", ...}."""
    train_set, val_set = labelled_images(train), labelled_images(val)
    if train_set.classes != val_set.classes:
        raise ValueError(f"{train} and {val} have different classes")
    head, fit = train_head(encoder, augment, train_set, protocol, chunk=batch_size, threads=threads, crop=crop)
    scores = evaluate_head(encoder, head, augment, val_set, chunk=batch_size, threads=threads)
    skipped = fit.pop("skipped")
    skipped.extend(scores.pop("skipped"))
    return {
        "protocol": "sgd", **scores, **fit, "classes": len(train_set.classes), "world_size": _ranks()[1],
        "epochs": protocol.epochs, "batch_size": protocol.batch_size, "lr": protocol.peak_lr, **skipped.report(),
    }  # fmt: skip
