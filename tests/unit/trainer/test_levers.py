"""The compute levers in the model and the FLOP count: dropped patch tokens leave the blocks'
computation, per view family; evaluation sees every token at the tower's size; views of other
sizes run through one tower; the schedule of dropout is a function of the step; FLOPs follow."""
from __future__ import annotations

import pytest
import torch

from profiling.flops import step_flops, vit_macs
from trainer.config import load_config
from trainer.levers import patch_dropout_at
from trainer.models import build_model
from trainer.models.vision import drop_patches
from trainer.objectives import OBJECTIVES


def _model(dynamic: bool = False):
    torch.manual_seed(0)
    return build_model("tiny", OBJECTIVES["slip"].parts, image_size=64, embed_dim=32, ssl_mlp_dim=64, ssl_emb_dim=32,
                       dynamic_img_size=dynamic)  # fmt: skip


def _block_lengths(model) -> list[int]:
    """The sequence length entering the first block, one entry per call."""
    seen: list[int] = []
    model.visual.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


def _views(b: int, sizes=(64, 64, 64)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(b, 3, s, s, generator=g) for k, s in zip(("image", "aug1", "aug2"), sizes)}


def test_dropped_patches_keep_the_class_token_and_a_subset_of_each_rows_patches() -> None:
    tokens = torch.randn(5, 1 + 64, 16)  # (b, 1 + L, d)
    out = drop_patches(tokens, 0.75)
    assert out.shape == (5, 1 + 16, 16)
    assert torch.equal(out[:, 0], tokens[:, 0])
    for row in range(5):
        match = (out[row, 1:, None, :] == tokens[row, None, 1:, :]).all(-1)  # (16, 64): kept i is input j
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()  # each kept one is a distinct input patch
    torch.manual_seed(3)
    a = drop_patches(tokens, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, drop_patches(tokens, 0.5))  # the masks are torch's CPU RNG's: replayed with it
    assert drop_patches(tokens, 0.0) is tokens


def test_dropped_tokens_are_not_computed_and_each_view_family_has_its_rate() -> None:
    model = _model().train()
    seen = _block_lengths(model)
    model.set_patch_dropout(0.5, 0.75)
    out = model(**_views(4))
    assert sorted(seen) == [1 + 16, 1 + 32]  # 64 patches: SSL views keep 16 (one packed forward), CLIP keeps 32
    assert out["image_embed"].shape == (4, 32) and out["aug1_embed"].shape == (4, 32)
    seen.clear()
    model.set_patch_dropout(0.5, 0.5)
    model(**_views(4))
    assert seen == [1 + 32]  # equal rates and sizes: one forward of all three views
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        model.set_patch_dropout(1.0, 0.0)


def test_evaluation_runs_every_token_whatever_the_training_rate() -> None:
    model = _model()
    model.set_patch_dropout(0.75, 0.75)
    seen = _block_lengths(model)
    x = _views(3)["image"]
    model.eval()
    with torch.no_grad():
        a = model.encode_image(x)
        b = model(image=x)["image_embed"]
    model.set_patch_dropout(0.0, 0.0)
    with torch.no_grad():
        c = model.encode_image(x)
    assert seen == [65, 65, 65] and torch.equal(a, c) and torch.equal(b, c)


def test_views_of_other_sizes_run_through_one_tower_with_a_resampled_position_embedding() -> None:
    model = _model(dynamic=True).train()
    seen = _block_lengths(model)
    out = model(**_views(2, sizes=(64, 32, 32)))
    assert sorted(seen) == [1 + 16, 1 + 64]  # 32 px: 4 x 4 patches of 8 px; 64 px: 8 x 8
    assert out["aug1_embed"].shape == (2, 32)
    seen.clear()
    model.set_patch_dropout(0.75, 0.0)  # 64 px with 3/4 dropped keeps 16: packs with the 32 px views
    model(**_views(2, sizes=(64, 32, 32)))
    assert seen == [1 + 16]
    # At its own size the dynamic tower is the fixed one: the same weights give the same features.
    fixed, dynamic = _model().eval(), _model(dynamic=True).eval()
    x = _views(2)["image"]
    with torch.no_grad():
        assert torch.allclose(fixed.encode_image(x), dynamic.encode_image(x), atol=1e-6)


def test_features_of_a_packed_forward_are_those_of_separate_forwards() -> None:
    model = _model(dynamic=True).train()
    views = _views(3, sizes=(64, 32, 32))
    torch.manual_seed(0)
    alone = model.visual.trunk(model.visual.tokens(views["image"], 0.75))
    torch.manual_seed(0)  # the same masks again, for the CLIP view packed with the 32 px view (16 tokens each)
    packed = model.visual.forward_views([views["image"], views["aug1"]], [0.75, 0.0])
    assert torch.allclose(packed[0], alone, atol=1e-5)
    assert torch.allclose(packed[1], model.visual.trunk(model.visual.tokens(views["aug1"], 0.0)), atol=1e-5)


def test_the_unmasked_tuning_is_the_last_steps_of_the_run() -> None:
    cfg = load_config("tiny_cpu", ["model.patch_dropout=0.5", "model.ssl_patch_dropout=0.25", "schedule.unmasked_steps=3"])
    assert [patch_dropout_at(cfg, s, 10) for s in (0, 6, 7, 9)] == [(0.5, 0.25), (0.5, 0.25), (0.0, 0.0), (0.0, 0.0)]
    same = load_config("tiny_cpu", ["model.patch_dropout=0.5"])
    assert patch_dropout_at(same, 0, 10) == (0.5, 0.5)  # -1: the SimCLR views take the CLIP view's rate


def test_flops_count_the_tokens_computed() -> None:
    full = vit_macs(224, 16, 768, 12)
    half = vit_macs(224, 16, 768, 12, drop=0.5)
    embed = 196 * 768 * 3 * 16 * 16  # every patch is embedded before any is dropped
    assert half - embed < 0.52 * (full - embed) and half > embed
    base = step_flops(load_config("slip_vitb16"), 4096)
    dropped = step_flops(load_config("slip_vitb16", ["model.patch_dropout=0.5"]), 4096)
    assert dropped.vision_macs == 3 * half and base.vision_macs == 3 * full
    assert dropped.text_macs == base.text_macs and dropped.train_flops < 0.6 * base.train_flops
