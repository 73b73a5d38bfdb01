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
from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.models import SIZES
from trainer.objectives import get_objective


def _block_macs(tokens: int, width: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block over `tokens` tokens, attention over all of them."""
    qkv_and_out = 4 * tokens * width * width
    attention = 2 * tokens * tokens * width  # Q K^T, then the weights times V
    mlp = 2 * tokens * width * int(width * mlp_ratio)
    return qkv_and_out + attention + mlp


def vit_macs(image_size: int, patch_size: int, width: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """One image through timm's VisionTransformer (class token included, no classifier)."""
    patches = (image_size // patch_size) ** 2
    patch_embed = patches * width * 3 * patch_size * patch_size
    return patch_embed + depth * _block_macs(patches + 1, width, mlp_ratio)


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


def step_flops(cfg: Config, batch_size: int | None = None) -> StepFlops:
    """The step `cfg` describes, at `batch_size` (default: cfg.data.batch_size, global).

    Text is counted at the model's full context (77), the usual convention for CLIP's MFU.
    slipstream's text tower truncates each batch to its longest caption, so the work it
    really does is lower and the MFU reported against this count is an upper bound."""
    m, objective = cfg.model, get_objective(cfg.model.objective)
    s = SIZES[m.size]
    batch = cfg.data.batch_size if batch_size is None else batch_size
    clip, ssl = objective.parts.clip, objective.parts.ssl
    views = len(objective.views)  # slip: image, aug1, aug2; clip: image; simclr: aug1, aug2
    return StepFlops(
        batch_size=batch,
        vision_macs=views * vit_macs(cfg.augment.image_size, s.patch_size, s.vision_width, s.vision_depth),
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


def measured_peak_flops(device: torch.device | str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n matmul, best of `repeats`: a peak for devices without a
    table entry (the CPU), to be labelled "measured matmul peak". n defaults to 1024 on the
    CPU (~2 GFLOP, tens of ms on 2 cores) and 8192 on a GPU, where small matmuls are bound
    by launch overhead rather than by the tensor cores."""
    device = torch.device(device)
    n = n or (1024 if device.type == "cpu" else 8192)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: kernel choice, thread-pool start
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def mfu(step_flops_per_s: float, peak: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s (per device) over that device's peak."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return step_flops_per_s / peak
