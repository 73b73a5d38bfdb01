"""LAMB in plain torch: the CPU twin of DeepSpeed's fused CUDA kernel, with the same update rule.

`optim.name: lamb` runs DeepSpeed's `deepspeed.ops.lamb.FusedLamb` on CUDA. That op is
JIT-built CUDA and cannot build on a CPU-only machine (CI, tests, `engine.device: cpu`),
so this module implements exactly the rule of DeepSpeed 0.19.8's kernel
(`ops/csrc/lamb/fused_lamb_cuda_kernel.cu`, driven by `ops/lamb/fused_lamb.py`), with the
same constructor, the same per-tensor state (`step`, `exp_avg`, `exp_avg_sq`) and the same
`lamb_coeffs` record. `tests/unit/trainer/test_lamb.py` holds a float64 oracle of the rule and,
where CUDA is visible, a parity test against FusedLamb itself.

The rule, per parameter tensor p with gradient g, at step t (1-based), group weight decay wd:

    g      = g / s                       s: the `scale` step argument (1), times the clip
                                         factor c = (norm / scale + 1e-6) / max_grad_norm when
                                         max_grad_norm > 0 and c > 1
    m      = b1 * m + (1 - b1) * g       no bias correction on m or v themselves
    v      = b2 * v + (1 - b2) * g^2
    d      = sqrt(v + eps)               if eps_inside_sqrt
           = sqrt(v) + eps               otherwise (the default)
    u      = m / d + wd * p              decoupled weight decay, added before the trust ratio
    r      = clamp(||p|| / ||u||, max then min: min(r, max_coeff), then max(r, min_coeff))
           = 1                           if ||p|| == 0 or ||u|| == 0 (no clamping then)
    eta    = lr * sqrt(1 - b2^t) / (1 - b1^t)    if bias_correction, else lr
    p      = p - eta * r * u

Norms are L2 over the whole tensor (one trust ratio per parameter tensor, as the kernel
launches once per tensor); ||p|| is taken before the update. Bias correction is folded into
the step size only, so it does not enter the trust ratio and eps is not bias corrected.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


class Lamb(torch.optim.Optimizer):
    """DeepSpeed FusedLamb's update rule in torch; fp32 (or fp64) parameters, math in their dtype.

    Same arguments and defaults as `deepspeed.ops.lamb.FusedLamb`. `step(closure, scale=,
    grad_norms=)` takes FusedLamb's loss-scale and clipping arguments; the `grads=` and
    `output_params=` arguments of its legacy fp16 path are not supported.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
    ) -> None:
        if amsgrad:
            raise RuntimeError("Lamb (like FusedLamb) does not support the AMSGrad variant.")
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        super().__init__(params, defaults)
        self.eps_mode = 0 if eps_inside_sqrt else 1  # FusedLamb's name: 0 = eps under the sqrt
        self.lamb_coeffs: list[torch.Tensor] = []  # this step's trust ratios, one (1,) tensor per updated param

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        scale: float = 1.0,
        grad_norms: Sequence[Any] | None = None,
    ) -> Any:
        """One LAMB step. grad_norms: per group, a norm (or one per param) of the *scaled* grads, as FusedLamb takes them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.lamb_coeffs.clear()
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            norms = None if grad_norms is None else grad_norms[gi]
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                if p.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"Lamb updates fp32 (or fp64) parameters, as FusedLamb does; got {p.dtype}")
                combined_scale = scale
                if group["max_grad_norm"] > 0:
                    if norms is None:
                        raise ValueError("Lamb: max_grad_norm > 0 needs step(grad_norms=...), as FusedLamb does")
                    norm = float(norms[pi] if isinstance(norms, (list, tuple)) else norms)
                    clip = ((norm / scale) + 1e-6) / group["max_grad_norm"]
                    if clip > 1:
                        combined_scale = clip * scale

                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]

                g = p.grad.to(p.dtype) / combined_scale
                m.mul_(beta1).add_(g, alpha=1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
                denom = (v + group["eps"]).sqrt_() if self.eps_mode == 0 else v.sqrt().add_(group["eps"])
                update = (m / denom).add_(p, alpha=group["weight_decay"])  # u = m / d + wd p

                w_norm = torch.linalg.vector_norm(p)  # ||p|| before the update
                u_norm = torch.linalg.vector_norm(update)
                ratio = (w_norm / u_norm).clamp(max=group["max_coeff"]).clamp(min=group["min_coeff"])
                coeff = torch.where((w_norm != 0) & (u_norm != 0), ratio, torch.ones_like(ratio))

                if group["bias_correction"]:
                    step_size = group["lr"] * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
                else:
                    step_size = group["lr"]
                p.sub_(update.mul_(step_size * coeff))  # p = p - eta r u
                self.lamb_coeffs.append(coeff.reshape(1))
        return loss

    def get_lamb_coeffs(self) -> list[float]:
        """The last step's trust ratios as floats, in parameter order (FusedLamb's method)."""
        return [c.item() for c in self.lamb_coeffs]
