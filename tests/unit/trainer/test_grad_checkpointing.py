"""Activation checkpointing of both towers changes memory, never the numbers.

Recomputing a block in backward runs the same ops on the same inputs, so the outputs and
every parameter gradient must match the plain forward/backward to fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from trainer.config import LossConfig
from trainer.models import SlipModel, build_model
from trainer.objectives import OBJECTIVES
from trainer.task import TrainingTask

B, IMAGE = 4, 32


def _model(objective: str = "slip") -> SlipModel:
    torch.manual_seed(0)
    return build_model("tiny", OBJECTIVES[objective].parts, image_size=IMAGE, embed_dim=32, ssl_mlp_dim=64, ssl_emb_dim=32)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 49406, (B, 77), generator=g)  # (B, 77)
    text[:, 12] = 49407  # end token
    text[:, 13:] = 0
    views = {k: torch.randn(B, 3, IMAGE, IMAGE, generator=g) for k in ("image", "aug1", "aug2")}  # (B, 3, H, W) each
    return {**views, "text": text}


def _forward_backward(model: SlipModel, task: TrainingTask, batch: dict[str, torch.Tensor]):
    model.zero_grad(set_to_none=True)
    inputs = task.model_inputs(batch)
    outputs = model(**inputs)
    losses = task.loss(outputs)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in outputs.items()}, losses["loss"].detach(), grads


@pytest.mark.parametrize("objective", ["slip", "clip", "simclr"])
def test_checkpointed_towers_give_the_same_outputs_and_gradients(objective: str) -> None:
    model = _model(objective).train()
    task = TrainingTask(OBJECTIVES[objective], LossConfig(backend="reference"))
    batch = _batch()
    want_out, want_loss, want_grads = _forward_backward(model, task, batch)
    # Every parameter takes part: a gradient missing under checkpointing would not be compared.
    assert set(want_grads) == {n for n, _ in model.named_parameters()}

    model.set_grad_checkpointing(True)
    got_out, got_loss, got_grads = _forward_backward(model, task, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    assert got_out.keys() == want_out.keys()
    for k in want_out:
        torch.testing.assert_close(got_out[k], want_out[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


def _block_calls(model: SlipModel) -> dict[str, int]:
    """Counts forward calls of the first block of each tower (pre-hooks: a recompute may
    stop early, once it has what backward needs, and never reach a forward hook)."""
    calls = {"vision": 0, "text": 0}

    def counter(name: str):
        def hook(*_):
            calls[name] += 1

        return hook

    model.visual.blocks[0].register_forward_pre_hook(counter("vision"))
    model.text.transformer.resblocks[0].register_forward_pre_hook(counter("text"))
    return calls


def test_blocks_are_recomputed_in_backward_and_save_activations() -> None:
    model = _model("slip").train()
    task = TrainingTask(OBJECTIVES["slip"], LossConfig(backend="reference"))
    batch = _batch()
    calls = _block_calls(model)

    def saved_bytes() -> int:
        # Bytes autograd keeps for backward outside checkpointed regions (those keep only their inputs).
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = task(model, batch)["loss"]
        loss.backward()
        return total

    plain = saved_bytes()
    assert calls == {"vision": 1, "text": 1}
    model.set_grad_checkpointing(True)
    checkpointed = saved_bytes()
    assert calls == {"vision": 3, "text": 3}  # forward + recompute in backward, per tower
    assert checkpointed < 0.7 * plain, (checkpointed, plain)

    # Without a backward to come the text tower does not checkpoint (timm's ViT decides for itself).
    with torch.no_grad():
        task(model, batch)
    model.eval()
    task(model, batch)["loss"].backward()
    assert calls["text"] == 5  # one call each, no recompute

    model.train().set_grad_checkpointing(False)
    assert not model.visual.grad_checkpointing and not model.text.transformer.grad_checkpointing
    before = dict(calls)
    assert saved_bytes() == plain
    assert calls == {k: v + 1 for k, v in before.items()}


def test_clip_and_simclr_parts() -> None:
    # SimCLR has no text tower: enabling must only touch the towers that exist.
    simclr = _model("simclr")
    simclr.set_grad_checkpointing(True)
    assert simclr.visual.grad_checkpointing and not hasattr(simclr, "text")
