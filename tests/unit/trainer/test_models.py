"""Every registered model size x objective: forward shapes on CPU-sized inputs."""
import math

import pytest
import torch

from trainer.models import SIZES, build_model
from trainer.objectives import OBJECTIVES


def _inputs(objective: str, b: int, image_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inputs = {v: torch.randn(b, 3, image_size, image_size, generator=g) for v in OBJECTIVES[objective].views}
    if OBJECTIVES[objective].text:
        text = torch.randint(1, 49406, (b, 77), generator=g)
        text[:, 0] = 49406
        ends = torch.tensor([5, 9, 76][:b])
        text[torch.arange(b), ends] = 49407
        text[torch.arange(77)[None, :] > ends[:, None]] = 0
        inputs["text"] = text
    return inputs


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("size", sorted(SIZES))
def test_forward_shapes(size: str, objective: str) -> None:
    # The paper's heads (512 / 4096 / 256) on the smallest image each patch size allows.
    image_size = 2 * SIZES[size].patch_size
    torch.manual_seed(0)
    model = build_model(size, OBJECTIVES[objective].parts, image_size=image_size).eval()
    b = 3
    with torch.no_grad():
        out = model(**_inputs(objective, b, image_size))
    expected = {}
    if OBJECTIVES[objective].parts.clip:
        expected.update(image_embed=(b, 512), text_embed=(b, 512), logit_scale=(1,))
    if OBJECTIVES[objective].parts.ssl:
        expected.update(aug1_embed=(b, 256), aug2_embed=(b, 256))
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    for v in out.values():
        assert torch.isfinite(v).all()
    if "logit_scale" in out:
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
        assert model.logit_scale.ndim == 1  # DeepSpeed 0.19.8 fails on 0-dim parameters


def test_tower_widths_follow_the_paper() -> None:
    assert (SIZES["vits16"].vision_width, SIZES["vits16"].vision_heads) == (384, 12)  # MoCo v3's ViT-S
    assert (SIZES["vitb16"].vision_width, SIZES["vitl16"].vision_width) == (768, 1024)
    for name in ("vits16", "vitb16", "vitl16"):
        s = SIZES[name]
        assert (s.text_width, s.text_layers, s.text_heads) == (512, 12, 8)


def test_objectives_build_only_their_parts() -> None:
    clip = build_model("tiny", OBJECTIVES["clip"].parts, image_size=16)
    simclr = build_model("tiny", OBJECTIVES["simclr"].parts, image_size=16)
    assert not hasattr(clip, "image_mlp") and hasattr(clip, "text")
    assert hasattr(simclr, "image_mlp") and not hasattr(simclr, "text") and not hasattr(simclr, "logit_scale")


def test_text_padding_past_the_end_token_changes_nothing() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", OBJECTIVES["clip"].parts, image_size=16).eval()
    text = _inputs("clip", 2, 16)["text"][:2]  # ends at 5 and 9
    with torch.no_grad():
        trimmed = model.encode_text(text)
        # Garbage after the end token must not matter (causal attention), nor the batch's length.
        noisy = text.clone()
        noisy[0, 6:] = torch.randint(1, 1000, (71,))
        noisy[0, 5] = 49407
        noisy[1, 10:] = torch.randint(1, 1000, (67,))
        alone = model.encode_text(text[:1])
    assert torch.allclose(trimmed[:1], alone, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(noisy), trimmed, atol=1e-5)


def test_views_in_one_forward_equal_separate_forwards() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", OBJECTIVES["slip"].parts, image_size=16).eval()
    inputs = _inputs("slip", 3, 16)
    with torch.no_grad():
        out = model(**inputs)
        assert torch.allclose(out["image_embed"], model.encode_image(inputs["image"]), atol=1e-5)
        assert torch.allclose(out["aug1_embed"], model.image_mlp(model.visual(inputs["aug1"])), atol=1e-5)


def test_unknown_size_and_bad_image_size() -> None:
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_model("huge", OBJECTIVES["slip"].parts, image_size=224)
    with pytest.raises(ValueError, match="not a multiple"):
        build_model("vitb16", OBJECTIVES["slip"].parts, image_size=100)
    assert math.isclose(build_model("tiny", OBJECTIVES["clip"].parts, image_size=16).logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_logit_scale_is_bounded_by_the_optimizer_not_the_forward() -> None:
    model = build_model("tiny", OBJECTIVES["clip"].parts, image_size=16)
    inputs = _inputs("clip", 2, 16)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
    out = model(**inputs)
    assert out["logit_scale"].item() == pytest.approx(math.exp(10.0), rel=1e-5)
    out["logit_scale"].sum().backward()
    assert model.logit_scale.grad.abs().item() > 0.0  # a forward clamp would pin it (test_logit_scale_clamp.py)
    assert model.param_bounds() == {"logit_scale": (0.0, math.log(100))}
