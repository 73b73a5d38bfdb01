"""Analytic FLOPs of a training step and device peaks, for model FLOP utilisation (MFU).

Counts are multiply-accumulates (MACs) of matmuls and convolutions only: norms, softmax,
activations, biases and embedding lookups are left out, the convention of fvcore and of
timm's and open_clip's published model profiles. FLOPs = 2 x MACs, and a training step is
3 x its forward (the backward computes the input and the weight gradient of each matmul).
That is MFU, not HFU: the extra forward that activation checkpointing recomputes is work
the hardware does but the model does not need, so it is not counted.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.levers import patch_dropout_at, sizes_at
from trainer.models import SIZES
from trainer.objectives import get_objective


def _block_macs(tokens: int, width: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block over `tokens` tokens, attention over all of them."""
    qkv_and_out = 4 * tokens * width * width
    attention = 2 * tokens * tokens * width  # Q K^T, then the weights times V
    mlp = 2 * tokens * width * int(width * mlp_ratio)
    return qkv_and_out + attention + mlp


def vit_macs(image_size: int, patch_size: int, width: int, depth: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> int:
    """One image through timm's VisionTransformer (class token included, no classifier). With
    patch dropout `drop`, every patch is embedded but the blocks compute only the tokens kept
    (`trainer.models.vision.drop_patches` keeps max(1, int(patches * (1 - drop))))."""
    patches = (image_size // patch_size) ** 2
    kept = max(1, int(patches * (1.0 - drop))) if drop > 0 else patches
    patch_embed = patches * width * 3 * patch_size * patch_size
    return patch_embed + depth * _block_macs(kept + 1, width, mlp_ratio)


def text_macs(width: int, layers: int, context_length: int) -> int:
    """One caption through the CLIP text transformer at `context_length` tokens. The causal
    mask is applied to a full attention matrix, so the masked half is counted too."""
    return layers * _block_macs(context_length, width, 4.0)


def ssl_mlp_macs(in_dim: int, mlp_dim: int, out_dim: int) -> int:
    """One view through SLIP's 3-layer SimCLR MLP."""
    return in_dim * mlp_dim + mlp_dim * mlp_dim + mlp_dim * out_dim


def head_macs(
    vision_width: int, text_width: int, embed_dim: int, ssl_mlp_dim: int, ssl_emb_dim: int, *, clip: bool, ssl: bool
) -> int:
    """Per sample: CLIP's image and text projections, and the SimCLR MLP on both augmented views."""
    macs = (vision_width + text_width) * embed_dim if clip else 0
    return macs + (2 * ssl_mlp_macs(vision_width, ssl_mlp_dim, ssl_emb_dim) if ssl else 0)


def loss_macs(batch: int, embed_dim: int, ssl_emb_dim: int, *, clip: bool, ssl: bool) -> int:
    """The logits of the global batch: CLIP's B x B image-text matrix, SimCLR's 2B x 2B over
    both views. These are the logical products; the chunked backend computes the CLIP matrix
    once for both directions and shares SimCLR's symmetric self-similarity tiles (3/4 of
    the count), the reference backend computes CLIP's twice. Against the towers it is ~1e-4."""
    macs = batch * batch * embed_dim if clip else 0
    return macs + ((2 * batch) ** 2 * ssl_emb_dim if ssl else 0)


@dataclass(frozen=True)
class StepFlops:
    batch_size: int  # global batch
    vision_macs: int  # per sample, every view the objective uses
    text_macs: int  # per sample
    head_macs: int  # per sample
    loss_macs: int  # the whole batch: the logits grow as batch^2

    @property
    def forward_macs(self) -> int:
        return self.batch_size * (self.vision_macs + self.text_macs + self.head_macs) + self.loss_macs

    @property
    def train_flops(self) -> int:
        """FLOPs of one optimizer step: 2 per MAC, forward + a backward of twice the forward."""
        return 3 * 2 * self.forward_macs

    @property
    def train_flops_per_sample(self) -> float:
        return self.train_flops / self.batch_size


def step_flops(cfg: Config, batch_size: int | None = None, *, step: int = 0, steps_per_epoch: int = 1, total: int = 1 << 62) -> StepFlops:
    """The step `cfg` describes, at `batch_size` (default: cfg.data.batch_size, global), as
    global step `step` computes it: each view at its size then, with the patch tokens its patch
    dropout keeps (`trainer.levers`).

    Text is counted at the model's full context (77), the usual convention for CLIP's MFU.
    slipstream's text tower truncates each batch to its longest caption, so the work it
    really does is lower and the MFU reported against this count is an upper bound."""
    m, objective = cfg.model, get_objective(cfg.model.objective)
    s = SIZES[m.size]
    batch = cfg.data.batch_size if batch_size is None else batch_size
    clip, ssl = objective.parts.clip, objective.parts.ssl
    clip_side, ssl_side = sizes_at(cfg, step, steps_per_epoch)
    clip_drop, ssl_drop = patch_dropout_at(cfg, step, total)
    per_view = {"image": vit_macs(clip_side, s.patch_size, s.vision_width, s.vision_depth, drop=clip_drop),
                "aug1": vit_macs(ssl_side, s.patch_size, s.vision_width, s.vision_depth, drop=ssl_drop)}  # fmt: skip
    per_view["aug2"] = per_view["aug1"]
    return StepFlops(
        batch_size=batch,
        vision_macs=sum(per_view[v] for v in objective.views),  # slip: image, aug1, aug2; clip: image; simclr: aug1, aug2
        text_macs=text_macs(s.text_width, s.text_layers, m.context_length) if objective.text else 0,
        head_macs=head_macs(s.vision_width, s.text_width, m.embed_dim, m.ssl_mlp_dim, m.ssl_emb_dim, clip=clip, ssl=ssl),
        loss_macs=loss_macs(batch, m.embed_dim, m.ssl_emb_dim, clip=clip, ssl=ssl),
    )


# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s from NVIDIA's datasheets, by a
# substring of torch.cuda.get_device_name; the first match wins, so PCIe and NVL come first.
_PEAKS: tuple[tuple[str, dict[str, float], str], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}, "NVIDIA H100 PCIe datasheet"),
    ("H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}, "NVIDIA H100 NVL datasheet"),
    ("H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}, "NVIDIA H100 SXM datasheet"),
    # H200 is H100 SXM's compute with more and faster memory.
    ("H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}, "NVIDIA H200 SXM datasheet"),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, "NVIDIA A100 datasheet"),
)


def _precision(dtype: torch.dtype) -> str | None:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"  # fp16 and bf16 have the same tensor-core peak on these parts
    if dtype == torch.float32:
        # fp32 matmuls run on tensor cores as TF32 only when torch is allowed to. Read the
        # new per-backend flag: get_float32_matmul_precision raises once both APIs were used.
        matmul = torch.backends.cuda.matmul
        flag = getattr(matmul, "fp32_precision", "none")
        tf32 = flag == "tf32" if flag != "none" else matmul.allow_tf32
        return "tf32" if tf32 else "fp32"
    return None


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str] | None:
    """(peak dense FLOP/s, where the number comes from) for a known GPU; None otherwise (CPU too)."""
    device = torch.device(device)
    precision = _precision(dtype)
    if device.type != "cuda" or precision is None or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks, source in _PEAKS:
        if key in name:
            return peaks[precision], f"{source}, dense {precision} ({name})"
    return None


def step_matmul_shapes(cfg: Config, rows_cap: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of the step's own big matmuls, per device: each tower's QKV projection and
    MLP up and down over a local batch of tokens, rows capped at `rows_cap` (the cost of
    measuring them; a matmul's rate levels off long before the step's row count)."""
    m, objective = cfg.model, get_objective(cfg.model.objective)
    s = SIZES[m.size]
    batch = max(1, cfg.data.batch_size)
    tokens = (cfg.augment.image_size // s.patch_size) ** 2 + 1
    towers = [(batch * tokens, s.vision_width)] + ([(batch * m.context_length, s.text_width)] if objective.text else [])
    shapes = []
    for rows, width in towers:
        rows = min(rows, rows_cap)
        shapes += [(rows, width, 3 * width), (rows, width, 4 * width), (rows, 4 * width, width)]
    return list(dict.fromkeys(shapes))


def _square(sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    return [(n, n, n) for n in sizes]


def measured_peak_flops(
    device: torch.device | str,
    dtypes: tuple[torch.dtype, ...],
    shapes: Sequence[tuple[int, int, int]] = (),
    *,
    repeats: int = 2,
    budget_s: float | None = None,
) -> tuple[float, int]:
    """(best FLOP/s, number of (dtype, shape) pairs timed): `F.linear`, the op the towers run,
    over `shapes` (rows, in, out) and a few squares, in each of `dtypes`, each the best of
    1 + `repeats` runs, stopping when `budget_s` is spent (default 1.5 s on the CPU, 3 s on a GPU).

    A peak must bound what the step achieves, so it is the best of many candidates: the CPU's
    fastest matmul depends on the dtype (autocast runs some of the step in fp32, and a CPU
    without bf16 instructions runs bf16 slower than fp32) and on the shape (a small square that
    stays in cache can beat a large one). Measured with this process's torch threads. Small
    matmuls on a GPU are bound by launch overhead, so its squares are large."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    budget_s = budget_s if budget_s is not None else (3.0 if gpu else 1.5)
    candidates = [*shapes, *_square((4096, 8192) if gpu else (256, 512, 1024))]

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    best, timed = 0.0, 0
    deadline = time.perf_counter() + budget_s
    for rows, k, n in dict.fromkeys(candidates):  # shape-major: a short budget still tries every dtype
        for dtype in dict.fromkeys(dtypes):
            if time.perf_counter() > deadline:
                return best, timed
            x, w = torch.randn(rows, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
            fastest = math.inf
            for _ in range(1 + repeats):  # the first also warms up (kernel choice, thread pool): it only can be slower
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                sync()
                fastest = min(fastest, time.perf_counter() - start)
                if time.perf_counter() > deadline:
                    break
            best, timed = max(best, 2 * rows * k * n / fastest), timed + 1
    return best, timed


def mfu(step_flops_per_s: float, peak: float) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s (per device) over that device's peak; None
    when the step beat the peak, which then bounds nothing (a figure over 100% is never shown)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    ratio = step_flops_per_s / peak
    return ratio if ratio <= 1.0 else None
