"""Checkpoints released by the SLIP reference (github.com/facebookresearch/SLIP, Mu et al. ECCV 2022)
as slipstream models, so the published SLIP, CLIP and SimCLR weights can be evaluated here.

A released `.pt` file is the reference's `torch.save({'epoch', 'state_dict', 'optimizer',
'scaler', 'best_acc1', 'args'})`, the state dict taken from the DDP wrapper (`module.` on
every key) and `args` an `argparse.Namespace`. It is read with `weights_only=True`, allowing
`argparse.Namespace` and nothing else beyond tensors and plain data: a downloaded file
cannot run code.

Reference key (after `module.`)                slipstream key
  visual.*  (timm VisionTransformer)             visual.*  (unchanged: see below)
  token_embedding.weight                         text.token_embedding.weight
  positional_embedding                           text.positional_embedding
  transformer.resblocks.N.*                      text.transformer.resblocks.N.*
  ln_final.*                                     text.ln_final.*
  image_projection, text_projection              unchanged
  logit_scale  []                                logit_scale  [1]
  image_mlp.{layer1,bn1,layer2,bn2,layer3}.*     unchanged (SyncBatchNorm and BatchNorm1d share keys)
  *attn_mask (not in the released files)         dropped: slipstream builds its causal mask itself

The reference built its image tower with an older timm (`vit_*_patch16_224(num_classes=0)`);
for that configuration timm 1.0's VisionTransformer has the same parameter names and shapes
(cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}, norm; the head, fc_norm, layer scales and q/k norms are parameterless Identity),
so no timm renames are needed.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.build import model_from_config
from trainer.config import Config, load_config
from trainer.models import SIZES, ModelParts, SlipModel
from trainer.objectives import OBJECTIVES
from trainer.recipe import CONFIG_DIR
from trainer.weights import check_fits

DDP_PREFIX = "module."

# The text tower sits at the top level of the reference model and under `text.` here.
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")

_BLOCK = re.compile(r"^visual\.blocks\.(\d+)\.")


def _strip_ddp(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(DDP_PREFIX): v for k, v in state.items()}


def read_release_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference checkpoint (or of a bare state dict saved with torch.save),
    on the CPU, with DDP's `module.` prefix removed. Every failure is one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file")
    try:
        # The released files pickle the training `args` (an argparse.Namespace of plain values);
        # allowing that one class is far narrower than weights_only=False, which runs any code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            # Memory-mapped: a ViT-L release is gigabytes, and its tensors are read once, when the
            # model copies them. Files in torch's pre-1.6 format cannot be mapped; they are read whole.
            zipped = zipfile.is_zipfile(path)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        # torch's weights-only refusal opens with a paragraph of advice; the line naming the
        # refused global ("unsupported GLOBAL os.system ...") is the one that says what is wrong.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        specific = [line for line in lines if "unsupported" in line.lower()] or [line for line in lines if not line.startswith("Weights only load failed")]
        reason = f"{type(err).__name__}: {specific[0] if specific else (lines or [''])[0]}".rstrip(": ")
        raise ValueError(f"{path}: not a loadable torch checkpoint with weights_only=True ({reason})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: not a SLIP reference checkpoint (expected a state dict, or a dict with 'state_dict')")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: not a SLIP reference checkpoint (state dict entry {key!r} is not a named tensor)")
    return _strip_ddp(state)


def convert_release_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference keys -> slipstream keys (see the module docstring). Idempotent: a state already
    in slipstream's layout comes back unchanged. Tensors are shared, not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _strip_ddp(state).items():
        if key.endswith("attn_mask"):
            continue  # a causal mask, rebuilt by the model
        if key.startswith(_TEXT_PREFIXES):
            key = f"text.{key}"
        elif key == "logit_scale":
            value = value.reshape(1)  # [] -> [1]: slipstream's is 1-d for DeepSpeed
        out[key] = value
    return out


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"not a SLIP/CLIP/SimCLR state dict: no '{key}'")
    return tuple(state[key].shape)


def _infer_objective(state: Mapping[str, torch.Tensor]) -> str:
    parts = ModelParts(
        clip=any(k.startswith("text.") for k in state),
        ssl=any(k.startswith("image_mlp.") for k in state),
    )
    for name, o in OBJECTIVES.items():
        if o.parts == parts:
            return name
    raise ValueError("neither a text tower (token_embedding.*) nor a SimCLR head (image_mlp.*): no known objective")


def _infer_size(state: Mapping[str, torch.Tensor]) -> str:
    width, _, patch, _ = _shape(state, "visual.patch_embed.proj.weight")  # (width, 3, patch, patch)
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    for name, s in SIZES.items():
        if (s.patch_size, s.vision_width, s.vision_depth) == (patch, width, depth):
            return name
    known = ", ".join(f"{n} {s.patch_size}/{s.vision_width}/{s.vision_depth}" for n, s in SIZES.items())
    raise ValueError(f"image tower patch {patch}, width {width}, depth {depth} is no registered size (patch/width/depth: {known}); pass size=")


def infer_objective_and_size(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """(objective, size) of a state dict in either layout: the objective from the parts present
    (text tower and SimCLR head: slip; text tower only: clip; head only: simclr), the size as the
    registered one whose patch, vision width and depth match the image tower's tensors."""
    state = convert_release_state(state)
    return _infer_objective(state), _infer_size(state)


def _model_overrides(state: Mapping[str, torch.Tensor]) -> list[str]:
    """`model.*` overrides read off the tensor shapes (state in slipstream's layout)."""
    overrides = []
    if "image_projection" in state:
        overrides.append(f"model.embed_dim={_shape(state, 'image_projection')[1]}")  # (vision_width, embed_dim)
    if "text.positional_embedding" in state:
        overrides.append(f"model.context_length={_shape(state, 'text.positional_embedding')[0]}")  # (L, width)
    if "text.token_embedding.weight" in state:
        overrides.append(f"model.vocab_size={_shape(state, 'text.token_embedding.weight')[0]}")  # (vocab, width)
    if "image_mlp.layer1.weight" in state:
        overrides.append(f"model.ssl_mlp_dim={_shape(state, 'image_mlp.layer1.weight')[0]}")  # (mlp_dim, vision_width)
    if "image_mlp.layer3.weight" in state:
        overrides.append(f"model.ssl_emb_dim={_shape(state, 'image_mlp.layer3.weight')[0]}")  # (emb_dim, mlp_dim)
    return overrides


def _trained_image_size(state: Mapping[str, torch.Tensor]) -> int:
    tokens = _shape(state, "visual.pos_embed")[1] - 1  # (1, 1 + grid**2, width): the class token first
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise ValueError(f"visual.pos_embed has {tokens} patch positions, not a square grid")
    return grid * _shape(state, "visual.patch_embed.proj.weight")[-1]


def release_config(
    state: Mapping[str, torch.Tensor],
    *,
    size: str | None = None,
    objective: str | None = None,
    image_size: int | None = None,
) -> Config:
    """The slipstream config of a reference state dict: the recipe `<objective>_<size>` where one
    exists (else the defaults), its model fields set from the tensor shapes. `size` and
    `objective` override what the state implies; `image_size` defaults to the trained one."""
    state = convert_release_state(state)
    objective = objective or _infer_objective(state)
    size = size or _infer_size(state)
    recipe = f"{objective}_{size}"
    image_size = image_size if image_size is not None else _trained_image_size(state)
    overrides = [f"model.size={size}", f"model.objective={objective}", f"augment.image_size={image_size}"]
    return load_config(recipe if (CONFIG_DIR / f"{recipe}.yaml").is_file() else None, overrides + _model_overrides(state))


def _resample_pos_embed(state: dict[str, torch.Tensor], model: SlipModel) -> None:
    """Interpolate the image tower's position embedding to the model's grid, as timm does when
    it loads a ViT at another resolution; a no-op at the trained size."""
    from timm.layers import resample_abs_pos_embed

    want = model.visual.pos_embed.shape
    have = state.get("visual.pos_embed")
    if have is None or have.shape == want or have.shape[-1] != want[-1]:
        return  # the fit check names any other disagreement
    new_grid = list(model.visual.patch_embed.grid_size)
    state["visual.pos_embed"] = resample_abs_pos_embed(have.float(), new_grid, num_prefix_tokens=1).to(have.dtype)


def load_release(
    path: str | Path,
    *,
    size: str | None = None,
    objective: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> SlipModel:
    """A released SLIP/CLIP/SimCLR checkpoint as a slipstream SlipModel, in eval mode.

    The size and objective are inferred from the weights unless given; `image_size` defaults to
    the size the weights were trained at (224 for every released model) and any other multiple
    of the patch size interpolates the position embedding. Loading is strict: a missing,
    unexpected or differently shaped key is a one-line ValueError naming the file and the key."""
    path = Path(path)
    state = convert_release_state(read_release_state(path))
    try:
        cfg = release_config(state, size=size, objective=objective, image_size=image_size)
        # Initialising the model draws from torch's global RNG; loading weights should not move the caller's.
        with torch.random.fork_rng(devices=[]):
            model = model_from_config(cfg)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    _resample_pos_embed(state, model)
    check_fits(model, state, f"{path}: does not fit slipstream {cfg.model.size}/{cfg.model.objective}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
