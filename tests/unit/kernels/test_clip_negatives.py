"""clip_negatives in one process, and its config key (the distributed comparison with the
reference's gradient is tests/integration/test_clip_negatives_distributed.py)."""
import pytest
import torch

from kernels import contrastive
from trainer.config import load_config


def _grads(clip_negatives: str, backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    leaves = [torch.randn(5, 8, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2)]  # (5, 8) each
    scale = torch.tensor([3.5], dtype=torch.float64, requires_grad=True)  # (1,)
    loss = contrastive.clip_loss(*leaves, scale, backend=backend, clip_negatives=clip_negatives)["loss"]
    loss.backward()
    return loss.detach(), [t.grad for t in (*leaves, scale)]


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_one_process_has_nothing_to_detach(backend: str) -> None:
    exact_loss, exact = _grads("exact", backend)
    loss, grads = _grads("detached", backend)
    assert torch.equal(loss, exact_loss) and all(torch.equal(a, b) for a, b in zip(grads, exact))


def test_an_unknown_mode_is_refused() -> None:
    e = torch.randn(4, 8)
    with pytest.raises(ValueError, match="clip_negatives 'approx'"):
        contrastive.clip_loss(e, e, torch.ones(1), clip_negatives="approx")


def test_the_config_key_defaults_to_exact_and_is_validated() -> None:
    assert load_config("tiny_cpu", []).loss.clip_negatives == "exact"
    assert load_config("tiny_cpu", ["loss.clip_negatives=detached"]).loss.clip_negatives == "detached"
    with pytest.raises(ValueError, match="loss.clip_negatives must be exact or detached, got 'approx'"):
        load_config("tiny_cpu", ["loss.clip_negatives=approx"])


def test_the_training_task_passes_the_key_to_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.config import LossConfig
    from trainer.objectives import OBJECTIVES
    from trainer.task import TrainingTask

    seen = []
    original = contrastive.slip_loss
    monkeypatch.setattr(contrastive, "slip_loss", lambda *a, **kw: seen.append(kw["clip_negatives"]) or original(*a, **kw))
    g = torch.Generator().manual_seed(3)
    out = {k: torch.randn(4, 8, generator=g) for k in ("image_embed", "text_embed", "aug1_embed", "aug2_embed")}  # (4, 8) each
    out["logit_scale"] = torch.tensor([10.0])  # (1,)
    TrainingTask(OBJECTIVES["slip"], LossConfig(clip_negatives="detached")).loss(out)
    assert seen == ["detached"]
