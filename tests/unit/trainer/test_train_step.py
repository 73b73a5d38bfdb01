"""The training step's pieces: a few optimizer steps on one fixed batch lower the loss."""
import pytest
import torch

from trainer.config import LossConfig
from trainer.models import build_model
from trainer.objectives import OBJECTIVES
from trainer.optim import build_optimizer, param_groups
from trainer.schedule import lr_at
from trainer.task import TrainingTask


def _batch(b: int = 16, image_size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 5000, (b, 77), generator=g)
    text[:, 8] = 49407
    text[:, 9:] = 0
    image = torch.rand(b, 3, image_size, image_size, generator=g)
    # Views are noisy copies of the image, as augmentations are: the SSL task is solvable.
    noise = lambda: 0.1 * torch.randn(image.shape, generator=g)  # noqa: E731
    return {"image": image, "aug1": image + noise(), "aug2": image + noise(), "text": text}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_steps_on_a_fixed_batch_lower_the_loss(objective: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", OBJECTIVES[objective].parts, image_size=16, embed_dim=32, ssl_mlp_dim=64, ssl_emb_dim=32)
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.98), 1e-8)
    task = TrainingTask(OBJECTIVES[objective], LossConfig())
    batch = _batch()
    losses = []
    for _ in range(8):
        out = task(model, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses
    expected = {"slip": {"clip_loss", "ssl_loss"}, "clip": {"clip_loss"}, "simclr": {"ssl_loss"}}[objective]
    assert expected <= set(out)


def test_no_weight_decay_on_biases_norms_and_scalars() -> None:
    model = build_model("tiny", OBJECTIVES["slip"].parts, image_size=16)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in no_decay_names
    assert all(p.ndim < 2 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("norm1.weight") for n in no_decay_names) and any(n.endswith(".bias") for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warms_up_linearly_then_follows_a_cosine() -> None:
    kw = dict(total=110, warmup=10, peak=1.0, start=0.0, end=0.1)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
