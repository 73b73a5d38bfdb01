"""The `reference` backend: plain torch that materialises the [b, B] logits.

It is the oracle the tiled backends are tested against, so it favours the obvious
formulation (cross-entropy over explicit logits, as SLIP's losses write it) over speed.

Every backend receives L2-normalised embeddings in the compute dtype (fp32, or fp64 in
tests): this rank's rows ([b, d]) and every rank's rows ([B, d], B = W*b, rank r's rows
at r*b), plus `offset` = rank*b, the index of local row 0 among the B candidates. It
returns (mean loss over this rank's rows, detached top-1 accuracy in percent).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Logit given to a row's own view-a (or view-b) candidate: finite, so that tiled online
# log-sum-exp never sees inf - inf, and far enough below any real logit (|logit| <= 1/t)
# that exp() of it is exactly 0. Backends share this value for bitwise-comparable masks.
SELF_MASK_LOGIT = -1e9


def _labels(b: int, offset: int, device: torch.device) -> Tensor:
    """Index of each local row's positive among the B candidates."""
    return torch.arange(b, device=device) + offset  # (b,)


def _top1(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).float().mean().mul(100).detach()  # ()


def clip(
    x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, logit_scale: Tensor, offset: int
) -> tuple[Tensor, Tensor]:
    """CLIP InfoNCE for this rank's rows. x, y: [b, d] images, texts; x_all, y_all: [B, d].

    loss = (mean_i l_i2t(i) + mean_i l_t2i(i)) / 2 over local rows; accuracy is
    image-to-text top-1, as the SLIP reference reports it.
    """
    labels = _labels(x.shape[0], offset, x.device)
    logits_i2t = logit_scale * x @ y_all.T  # (b, B)
    logits_t2i = logit_scale * y @ x_all.T  # (b, B)
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    return loss, _top1(logits_i2t, labels)


def simclr(
    a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, temperature: float, offset: int
) -> tuple[Tensor, Tensor]:
    """NT-Xent as SLIP's SIMCLRLoss. a, b: [b, d] the two views; a_all, b_all: [B, d].

    View-a row i scores all B view-b rows and all B view-a rows with its own entry masked
    (kept in the row at SELF_MASK_LOGIT, not dropped, so indices stay aligned with the
    labels); the positive is b_i. Symmetric for view b. Accuracy: view-a rows' top-1.
    """
    labels = _labels(a.shape[0], offset, a.device)
    self_mask = F.one_hot(labels, a_all.shape[0]).bool()  # (b, B), True at r*b + i
    logits_ab = a @ b_all.T / temperature  # (b, B)
    logits_ba = b @ a_all.T / temperature  # (b, B)
    logits_aa = (a @ a_all.T / temperature).masked_fill(self_mask, SELF_MASK_LOGIT)  # (b, B)
    logits_bb = (b @ b_all.T / temperature).masked_fill(self_mask, SELF_MASK_LOGIT)  # (b, B)
    logits_a = torch.cat([logits_ab, logits_aa], dim=1)  # (b, 2B)
    logits_b = torch.cat([logits_ba, logits_bb], dim=1)  # (b, 2B)
    loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
    return loss, _top1(logits_a, labels)
