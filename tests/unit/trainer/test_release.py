"""Checkpoints in the SLIP reference's layout load into slipstream models, bit for bit."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from trainer.build import model_from_config
from trainer.config import load_config
from trainer.models.registry import build_model
from trainer.objectives import get_objective
from trainer.release import (
    convert_release_state,
    infer_objective_and_size,
    load_release,
    read_release_state,
    release_config,
)

OBJECTIVES = ("slip", "clip", "simclr")
END_TOKEN = 49407  # the largest id: the text tower reads its feature there


def to_reference_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """slipstream -> the reference's DDP state dict, written independently of the module under test:
    the text tower at the top level, a 0-dim logit scale, `module.` on every key. The timm ViT keys
    of the reference's timm (0.4/0.5 era) are those of timm 1.0 for a num_classes=0 ViT."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("text.")
        if key == "logit_scale":
            value = value.reshape(())
        out["module." + key] = value
    return out


def released_checkpoint(state: dict[str, torch.Tensor], model: str = "SLIP_VITB16") -> dict:
    """What the reference's main.py saves each epoch (a plain-data optimizer and scaler state)."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=3e-3, betas=(0.9, 0.98))
    p.grad = torch.ones(3)
    opt.step()
    args = argparse.Namespace(model=model, ssl_mlp_dim=4096, ssl_emb_dim=256, betas=(0.9, 0.98), gpu=0, distributed=True, dist_url="env://")
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    return {"epoch": 3, "state_dict": state, "optimizer": opt.state_dict(), "scaler": scaler, "best_acc1": 12.5, "args": args}


def randomised_tiny(objective: str) -> torch.nn.Module:
    """A tiny model whose every parameter and BatchNorm statistic differs from its init."""
    torch.manual_seed(0)
    model = model_from_config(load_config("tiny_cpu", [f"model.objective={objective}"]))
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.copy_(torch.rand(p.shape, generator=g) * 4.6)  # within the clamp
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return model.eval()


def inputs(objective: str, image_size: int = 64, b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 49000, (b, 77), generator=g)
    ends = torch.randint(5, 77, (b,), generator=g)
    for i, end in enumerate(ends.tolist()):
        text[i, end] = END_TOKEN
        text[i, end + 1:] = 0
    image, aug1, aug2 = (torch.randn(b, 3, image_size, image_size, generator=g) for _ in range(3))
    views = {"image": image, "text": text, "aug1": aug1, "aug2": aug2}
    wanted = {"slip": ("image", "text", "aug1", "aug2"), "clip": ("image", "text"), "simclr": ("aug1", "aug2")}[objective]
    return {k: views[k] for k in wanted}


@pytest.fixture(scope="module", params=OBJECTIVES)
def released(request, tmp_path_factory):
    objective = request.param
    model = randomised_tiny(objective)
    path = tmp_path_factory.mktemp(objective) / f"{objective}_tiny.pt"
    torch.save(released_checkpoint(to_reference_layout(model.state_dict())), path)
    return objective, model, path


@torch.no_grad()
def test_released_checkpoint_loads_bit_for_bit(released):
    objective, original, path = released
    for size in ("tiny", None):  # explicit, and inferred from the registry (tiny is registered)
        loaded = load_release(path, size=size, image_size=64)
        assert not loaded.training
        assert loaded.parts == get_objective(objective).parts
        x = inputs(objective)
        want, got = original(**x), loaded(**x)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name
        if objective != "simclr":
            assert torch.equal(loaded.encode_text(x["text"]), original.encode_text(x["text"]))
            assert torch.equal(loaded.encode_image(x["image"]), original.encode_image(x["image"]))


def reference_encode_text(sd: dict[str, torch.Tensor], text: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference's CLIP.encode_text, re-derived on its own state dict: sequence-first
    nn.MultiheadAttention over all 77 positions under a causal mask (slipstream runs batch-first
    and stops at the batch's last end token; the two agree because attention is causal)."""
    import torch.nn.functional as F

    width = sd["positional_embedding"].shape[1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"])

    x = (F.embedding(text, sd["token_embedding.weight"]) + sd["positional_embedding"]).permute(1, 0, 2)  # (L, b, width)
    mask = torch.full((text.shape[1],) * 2, float("-inf")).triu_(1)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads)
        attn.load_state_dict({k[len(p + "attn."):]: v for k, v in sd.items() if k.startswith(p + "attn.")})
        h = ln(x, p + "ln_1")
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    x = ln(x.permute(1, 0, 2), "ln_final")  # (b, L, width)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ sd["text_projection"]


@torch.no_grad()
def test_text_tower_matches_the_reference_computation(released):
    objective, original, path = released
    if objective == "simclr":  # nothing to compare: the reference's SimCLR has no text tower either
        assert not any(k.startswith(("text.", "token_embedding")) for k in original.state_dict())
        return
    sd = {k.removeprefix("module."): v for k, v in to_reference_layout(original.state_dict()).items()}
    text = inputs(objective)["text"]
    loaded = load_release(path)
    torch.testing.assert_close(loaded.encode_text(text), reference_encode_text(sd, text, heads=4), rtol=1e-5, atol=1e-5)
    # The reference reports exp(logit_scale) unclamped; its training clamped the parameter to [0, ln 100].
    assert torch.equal(loaded(image=inputs(objective)["image"])["logit_scale"], sd["logit_scale"].exp().reshape(1))


def test_image_size_defaults_to_the_trained_one(released):
    _, original, path = released
    loaded = load_release(path)  # 64 px: the position-embedding grid says so
    assert torch.equal(loaded.visual.pos_embed, original.visual.pos_embed)


@torch.no_grad()
def test_other_image_size_interpolates_the_position_embedding(released):
    _, original, path = released
    loaded = load_release(path, image_size=128)
    assert loaded.visual.pos_embed.shape == (1, 1 + 16 * 16, 96)
    assert torch.equal(loaded.visual.pos_embed[:, :1], original.visual.pos_embed[:, :1])  # class token kept
    feats = loaded(image=torch.randn(2, 3, 128, 128), stage="towers")["image"]
    assert feats.shape == (2, 96) and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match=rf"{path.name}: .*not a multiple of tiny's patch size 8"):
        load_release(path, image_size=60)


def test_read_strips_ddp_and_accepts_a_bare_state_dict(released, tmp_path):
    _, original, path = released
    state = read_release_state(path)
    assert not any(k.startswith("module.") for k in state)
    assert state["logit_scale"].shape == () if "logit_scale" in state else True
    bare = tmp_path / "bare.pt"
    torch.save({k.removeprefix("module."): v for k, v in to_reference_layout(original.state_dict()).items()}, bare)
    assert state.keys() == read_release_state(bare).keys()


def test_convert_maps_keys_and_is_idempotent(released):
    _, original, path = released
    converted = convert_release_state(read_release_state(path))
    assert converted.keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        assert converted[k].shape == v.shape, k
    assert convert_release_state(converted).keys() == converted.keys()
    with_mask = dict(read_release_state(path), **{"transformer.resblocks.0.attn_mask": torch.zeros(77, 77)})
    assert convert_release_state(with_mask).keys() == converted.keys()  # a causal mask is rebuilt, not loaded


# Shape-only state dicts of the released sizes, on the meta device: no memory, no init time.
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("size", ["vits16", "vitb16", "vitl16"])
def test_infers_released_sizes_from_shapes(size, objective):
    with torch.device("meta"):
        model = build_model(size, get_objective(objective).parts, image_size=224, embed_dim=256, ssl_mlp_dim=1024, ssl_emb_dim=64)
    state = to_reference_layout(model.state_dict())
    assert infer_objective_and_size(state) == (objective, size)
    assert infer_objective_and_size(convert_release_state(state)) == (objective, size)
    cfg = release_config(state)
    assert (cfg.model.size, cfg.model.objective, cfg.augment.image_size) == (size, objective, 224)
    if objective != "simclr":
        assert (cfg.model.embed_dim, cfg.model.context_length, cfg.model.vocab_size) == (256, 77, 49408)
    if objective != "clip":
        assert (cfg.model.ssl_mlp_dim, cfg.model.ssl_emb_dim) == (1024, 64)


def test_unregistered_or_headless_states_are_named():
    with torch.device("meta"):
        model = build_model("vitb16", get_objective("slip").parts, image_size=224)
    state = {k: v for k, v in to_reference_layout(model.state_dict()).items() if ".blocks.11." not in k}
    with pytest.raises(ValueError, match="patch 16, width 768, depth 11 is no registered size"):
        infer_objective_and_size(state)
    only_vision = {k: v for k, v in state.items() if k.startswith("module.visual.")}
    with pytest.raises(ValueError, match="no known objective"):
        infer_objective_and_size(only_vision)


def test_wrong_size_names_the_file_the_key_and_both_shapes(released):
    objective, _, path = released
    with pytest.raises(ValueError) as err:
        load_release(path, size="vits16", image_size=64)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: does not fit slipstream vits16/{objective}")
    first = "image_projection' has shape (96, 128), model wants (384, 128)" if objective != "simclr" else "visual.cls_token' has shape (1, 1, 96), model wants (1, 1, 384)"
    assert first in msg


def test_wrong_objective_names_the_first_key_off(released):
    objective, _, path = released
    asked, expect = {
        "slip": ("clip", "unexpected key 'image_mlp.layer1.weight'"),
        "clip": ("slip", "missing key 'image_mlp.layer1.weight'"),
        "simclr": ("slip", "missing key 'image_projection'"),
    }[objective]
    with pytest.raises(ValueError, match=rf"^{path}: does not fit slipstream tiny/{asked}: {expect}"):
        load_release(path, objective=asked)


@pytest.mark.parametrize("damage", ["missing", "shape", "unexpected"])
def test_damaged_state_names_the_key(released, tmp_path, damage):
    objective, original, _ = released
    state = to_reference_layout(original.state_dict())
    if damage == "missing":
        del state["module.visual.blocks.1.mlp.fc1.bias"]
        expect = "missing key 'visual.blocks.1.mlp.fc1.bias' (model wants shape (384,))"
    elif damage == "shape":
        state["module.visual.blocks.1.mlp.fc1.weight"] = torch.zeros(383, 96)
        expect = "'visual.blocks.1.mlp.fc1.weight' has shape (383, 96), model wants (384, 96)"
    else:
        state["module.visual.head.weight"] = torch.zeros(1000, 96)
        expect = "unexpected key 'visual.head.weight' (shape (1000, 96); 1 unexpected)"
    path = tmp_path / "damaged.pt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    with pytest.raises(ValueError) as err:
        load_release(path)
    assert str(err.value) == f"{path}: does not fit slipstream tiny/{objective}: {expect}"


def test_not_a_checkpoint_names_the_file(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=rf"^{text}: not a loadable torch checkpoint"):
        load_release(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{empty}: not a loadable torch checkpoint"):
        read_release_state(empty)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match=rf"^{listing}: not a SLIP reference checkpoint"):
        read_release_state(listing)
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "best_acc1": 1.0}, no_tensors)
    with pytest.raises(ValueError, match=rf"^{no_tensors}: not a SLIP reference checkpoint .*'epoch'"):
        read_release_state(no_tensors)
    with pytest.raises(FileNotFoundError, match="nope.pt: no such checkpoint file"):
        load_release(tmp_path / "nope.pt")


class _Payload:
    """Unpickling this would run code: weights_only must refuse it, not run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"module.logit_scale": torch.zeros(())}, "args": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=rf"^{path}: not a loadable torch checkpoint with weights_only=True \(.*makedirs"):
        read_release_state(path)
    assert not marker.exists()
