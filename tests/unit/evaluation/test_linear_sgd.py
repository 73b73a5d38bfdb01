"""The paper's linear probe (SGD on augmented views of a frozen trunk): its schedule and head, its
steps against an SGD written out in the test, its accuracy on separable data, and several gloo
ranks against one process."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.linear_sgd import SgdProtocol, evaluate_head, linear_probe_sgd, train_head
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import labelled_images
from pipeline.probe_view import iter_train_views
from tests.ranks import free_port, spawn_ranks

AUG = AugmentConfig(image_size=32)
COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}  # sorted: the label order


class MeanColour(torch.nn.Module):
    """A frozen trunk whose pooled feature is a fixed projection of the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
            self.proj.bias.zero_()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.mean(dim=(2, 3)))  # (b, 8)


def _classes(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(36, 80, size=2))
            img = np.clip(np.array(colour) + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sgd")
    return _classes(root / "train", 12, 1), _classes(root / "val", 6, 2)


def test_the_protocol_is_the_papers() -> None:
    p = SgdProtocol()
    assert (p.epochs, p.batch_size, p.momentum, p.weight_decay, p.init_std) == (90, 1024, 0.9, 0.0, 0.01)
    assert p.peak_lr == pytest.approx(0.4)  # 0.1 x 1024 / 256
    assert p.lr_at(0) == pytest.approx(0.4) and p.lr_at(45) == pytest.approx(0.2)
    assert all(p.lr_at(e) > p.lr_at(e + 1) > 0 for e in range(89))
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"base_lr": -1.0}, {"base_lr": float("nan")}):
        with pytest.raises(ValueError):
            SgdProtocol(**bad)


def test_each_epoch_is_one_momentum_step_of_the_mean_cross_entropy(sets: tuple[Path, Path]) -> None:
    train, _ = sets
    protocol = SgdProtocol(epochs=3, batch_size=64, base_lr=8.0, seed=4)  # 36 images: one step per epoch
    encoder = MeanColour()
    head, fit = train_head(encoder, AUG, labelled_images(train), protocol)

    # The oracle: the same views, features and head start, and SGD with momentum written out.
    samples, labels = labelled_images(train).samples()
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(4)) * 0.01
    bias, buffers = torch.zeros(3), None
    for epoch in range(3):
        (views, keys), = iter_train_views([samples], AUG, seed=4, epoch=epoch, max_batch=64)
        with torch.no_grad():
            x = encoder.encode_image(views)
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        F.cross_entropy(x @ w.T + b, labels[keys]).backward()
        grads = (w.grad, b.grad)
        buffers = grads if buffers is None else tuple(0.9 * m + g for m, g in zip(buffers, grads))
        lr = 8.0 * 64 / 256 * 0.5 * (1 + math.cos(math.pi * epoch / 3))
        weight, bias = weight - lr * buffers[0], bias - lr * buffers[1]
    assert torch.allclose(head.weight.detach(), weight, atol=1e-5) and torch.allclose(head.bias.detach(), bias, atol=1e-5)
    assert fit["n_train"] == 36 and len(fit["train_loss"]) == 3 and fit["images_per_s"] > 0


def test_separable_classes_are_learned_and_a_bad_image_is_skipped_once(sets: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = sets
    dirty = tmp_path / "train"
    for f in train.rglob("*.jpg"):
        (dirty / f.parent.name).mkdir(parents=True, exist_ok=True)
        (dirty / f.parent.name / f.name).write_bytes(f.read_bytes())
    (dirty / "red" / "999.jpg").write_bytes((train / "red" / "000.jpg").read_bytes()[:200])  # truncated
    r = linear_probe_sgd(MeanColour(), AUG, dirty, val, SgdProtocol(epochs=12, batch_size=8, base_lr=2.0))
    assert r["top1"] >= 0.9 and r["top5"] == 1.0 and r["n_val"] == 18 and r["n_train"] == 36
    assert r["train_loss"][-1] < r["train_loss"][0]
    assert r["skipped"] == {"truncated": 1} and r["world_size"] == 1  # read every epoch, counted once


def test_a_head_that_knows_nothing_scores_chance(sets: tuple[Path, Path]) -> None:
    _, val = sets
    head = torch.nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # always "red"
    r = evaluate_head(MeanColour(), head, AUG, labelled_images(val))
    assert r["top1"] == pytest.approx(1 / 3) and r["n_val"] == 18


def _rank(rank: int, world: int, port: int, train: str, val: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        protocol = SgdProtocol(epochs=2, batch_size=10, base_lr=4.0, seed=7)  # 36 images: 4 steps, the last of 6
        head, fit = train_head(MeanColour(), AUG, labelled_images(train), protocol)
        scores = evaluate_head(MeanColour(), head, AUG, labelled_images(val))
        torch.save({"head": head.state_dict(), "loss": fit["train_loss"], "top1": scores["top1"], "n": fit["n_train"]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_train_the_head_one_process_trains(sets: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = sets
    out = tmp_path / "rank"
    spawn_ranks(_rank, 2, (2, free_port(), str(train), str(val), str(out)), timeout_s=300, what="two-rank SGD probe")
    head, fit = train_head(MeanColour(), AUG, labelled_images(train), SgdProtocol(epochs=2, batch_size=10, base_lr=4.0, seed=7))
    top1 = evaluate_head(MeanColour(), head, AUG, labelled_images(val))["top1"]
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for name, value in head.state_dict().items():
            assert torch.allclose(got["head"][name], value, atol=1e-6), (rank, name)
        assert got["top1"] == top1 and got["n"] == fit["n_train"] == 36
        assert np.allclose(got["loss"], fit["train_loss"], rtol=1e-6)


def _failing_rank(rank: int, world: int, port: int, train: str, out: str) -> None:
    import evaluation.linear_sgd as sgd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    if rank == 1:
        calls = {"n": 0}
        encode = sgd._encode

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:  # the width probe, then two batches
                raise OSError(5, "Input/output error")
            return encode(*args, **kwargs)

        sgd._encode = broken
    try:
        train_head(MeanColour(), AUG, labelled_images(train), SgdProtocol(epochs=3, batch_size=10, seed=1))
        Path(f"{out}.{rank}").write_text("finished")
    except (OSError, RuntimeError) as err:
        Path(f"{out}.{rank}").write_text(f"{type(err).__name__}: {err}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_instead_of_hanging_them(sets: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "rank"
    spawn_ranks(_failing_rank, 2, (2, free_port(), str(sets[0]), str(out)), timeout_s=120, what="a probe with a failing rank")
    assert (tmp_path / "rank.1").read_text() == "OSError: [Errno 5] Input/output error"
    assert (tmp_path / "rank.0").read_text().startswith("RuntimeError: linear probe (sgd): 1 other rank(s) failed at epoch 0")
