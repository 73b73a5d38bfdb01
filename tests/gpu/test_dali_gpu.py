"""The GPU twin of the CPU loader tests: DALI's mixed (nvJPEG) decode path."""
from pathlib import Path

import pytest
import torch

from pipeline.augment_config import AugmentConfig
from pipeline.loader import ThreeViewLoader
from pipeline.reader import BetonDataset
from pipeline.sampler import EpochSampler

pytestmark = pytest.mark.gpu


def test_gpu_pipeline_batch_contract(tmp_path: Path, make_shapes_beton) -> None:
    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=32))
    aug = AugmentConfig(image_size=32)
    gpu = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), ("image", "aug1", "aug2"), aug, device="gpu")
    cpu = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), ("image", "aug1", "aug2"), aug, device="cpu")
    g, c = next(gpu), next(cpu)
    for view in ("image", "aug1", "aug2"):
        assert g[view].is_cuda and g[view].shape == (8, 3, 32, 32) and g[view].dtype == torch.float32
    assert g["text"].is_cuda and torch.equal(g["text"].cpu(), c["text"])
    assert torch.equal(g["index"].cpu(), c["index"])


@pytest.mark.parametrize(("views", "text"), [(("image",), True), (("aug1", "aug2"), False), (("image", "aug1", "aug2"), True)])
def test_gpu_objective_decides_the_outputs(tmp_path: Path, make_shapes_beton, views: tuple, text: bool) -> None:
    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=32))
    loader = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), views, AugmentConfig(image_size=32), text=text, device="gpu")
    batch = next(loader)
    assert set(batch) == {*views, "index", *(("text",) if text else ())}
    first = {k: v.clone() for k, v in batch.items()}
    for _ in range(3):  # DALI's device buffers are handed over without a copy and must not be reused
        next(loader)
    assert all(torch.equal(batch[k], first[k]) for k in batch)


def _gray_frequency(dataset: BetonDataset, grayscale_p: float) -> float:
    aug = AugmentConfig(image_size=32, jitter_p=0.0, blur_p=0.0, flip_p=0.0, grayscale_p=grayscale_p)
    loader = ThreeViewLoader(dataset, EpochSampler(len(dataset), 128, seed=0), ("aug1", "aug2"), aug, text=False, device="gpu")
    mean, std = torch.tensor(aug.mean, device="cuda")[:, None, None], torch.tensor(aug.std, device="cuda")[:, None, None]
    gray = []
    for _ in range(8):
        batch = next(loader)
        for view in ("aug1", "aug2"):
            pixels = batch[view] * std + mean  # (b, 3, S, S)
            spread = torch.maximum((pixels[:, 0] - pixels[:, 1]).abs(), (pixels[:, 1] - pixels[:, 2]).abs())
            gray.append((spread.amax(dim=(1, 2)) < 2 / 255).float())
    return torch.cat(gray).mean().item()  # over 2048 views


def test_gpu_grayscale_frequency(tmp_path: Path, make_shapes_beton) -> None:
    # A coarse check of the GPU graph's draws (the CPU graph has the full statistical tests).
    # Some crops are grey already (a grey shape on a grey background), so measure them first.
    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=256))
    already = _gray_frequency(dataset, 0.0)
    expected = already + (1 - already) * 0.2
    assert abs(_gray_frequency(dataset, 0.2) - expected) < 4.5 * (expected * (1 - expected) / 2048) ** 0.5 + 0.01


def test_gpu_evaluation_view_matches_the_cpu_one(tmp_path: Path, make_shapes_beton) -> None:
    # A model on the GPU decodes its evaluation images with nvJPEG; the features must be those
    # of the CPU path up to decoder rounding.
    from evaluation.features import image_features
    from pipeline.eval_view import iter_beton
    from trainer.config import load_config

    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=24))
    aug = AugmentConfig(image_size=64)
    torch.manual_seed(0)
    from trainer.build import model_from_config

    model = model_from_config(load_config("tiny_cpu")).eval()
    cpu, cpu_order = image_features(model, iter_beton(dataset, aug, batch_size=8), 3, "cpu")
    model = model.cuda()
    gpu, gpu_order = image_features(model, iter_beton(dataset, aug, batch_size=8, device="gpu"), 3, "gpu")
    assert torch.equal(cpu_order, gpu_order)
    assert torch.nn.functional.cosine_similarity(cpu, gpu).min() > 0.98


def test_half_views_pinned_copies_and_held_buffers(tmp_path: Path, make_shapes_beton) -> None:
    # bf16 training reads fp16 views; the text and index arrive without stopping the host; a
    # batch's buffers stay DALI's until the work queued after it has run.
    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=32))
    loader = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), ("image", "aug1"), AugmentConfig(image_size=32),
                             device="gpu", half=True)  # fmt: skip
    full = ThreeViewLoader(dataset, EpochSampler(len(dataset), 8, seed=0), ("image", "aug1"), AugmentConfig(image_size=32), device="gpu")
    a, b = next(loader), next(full)
    assert a["image"].dtype == torch.float16 and b["image"].dtype == torch.float32
    assert torch.allclose(a["image"].float(), b["image"], atol=1e-2)  # the same draws, fp16 rounding apart
    assert a["text"].is_cuda and a["index"].is_cuda
    torch.cuda._sleep(10**8)  # a long kernel on torch's stream, queued after this batch's use
    next(loader)
    assert loader.handoff.held == 1  # the first batch is still DALI's to keep: the work after it has not run
    torch.cuda.synchronize()
    next(loader)
    assert loader.handoff.held <= 1  # the first released once its event completed
    loader.close()
    assert loader.handoff.held == 0


def test_undecodable_samples_are_judged_by_the_gpu_decoder(tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from pipeline.loader import dali_decodes

    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(good, format="JPEG")
    data = np.frombuffer(good.getvalue(), dtype=np.uint8)
    bad = data.copy()
    bad[len(bad) // 2 :] = 0  # the entropy-coded data wiped
    assert dali_decodes([data, bad, data], device="gpu") == dali_decodes([data, bad, data], device="cpu")
    assert dali_decodes([data], device="gpu") == [True]


def test_gpu_probe_view_cuts_the_cpu_views_window(tmp_path: Path, make_shapes_beton) -> None:
    from pipeline.eval_view import beton_sample
    from pipeline.probe_view import iter_train_views

    dataset = BetonDataset(make_shapes_beton(tmp_path, train_size=16))
    samples = [beton_sample(dataset, i, i) for i in range(16)]
    aug = AugmentConfig(image_size=32)
    cpu, _ = next(iter_train_views([samples], aug, seed=3, epoch=0, max_batch=16))
    gpu, keys = next(iter_train_views([samples], aug, seed=3, epoch=0, max_batch=16, device="gpu"))
    assert gpu.is_cuda and keys.tolist() == list(range(16))
    # nvJPEG's window decode and the GPU resize against the CPU kernel: rounding apart, not another window.
    assert (cpu - gpu.cpu()).abs().mean(dim=(1, 2, 3)).max() < 0.05
