"""Classification metrics over logits [N, C] and integer labels [N], as fractions in 0..1: the ones
SLIP's zero-shot table reports (top-1, mean per-class accuracy, (top-1 + top-5)/2, ROC AUC)."""
from __future__ import annotations

import torch


def top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """The fraction of rows whose label is among their k highest logits (k is capped at C)."""
    _check(logits, labels)
    ranked = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return float((ranked == labels[:, None]).any(dim=1).float().mean())


def mean_per_class(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy within each class that has rows, averaged over those classes (a class with no
    rows has no accuracy, and predictions of it count only as errors of the true class)."""
    _check(logits, labels)
    hit = (logits.argmax(dim=1) == labels).double()
    n_classes = logits.shape[1]
    per_class_hits = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, labels, hit)
    per_class_rows = torch.bincount(labels, minlength=n_classes).double()
    present = per_class_rows > 0
    return float((per_class_hits[present] / per_class_rows[present]).mean())


def top1_top5_mean(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """(top-1 + top-5) / 2: what SLIP reports for Kinetics-700 frames."""
    return (top_k(logits, labels, 1) + top_k(logits, labels, 5)) / 2


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The area under the ROC curve of `scores` for the rows where `positive` is true: the chance a
    random positive outscores a random negative, ties counting one half (Mann-Whitney U from
    average ranks). Needs at least one row of each kind."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if len(scores) != len(positive):
        raise ValueError(f"{len(scores)} scores but {len(positive)} labels")
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positive and {n_neg} negative rows")
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    # Tied scores share the mean of the ranks they span.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # (groups,)
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_auc(logits: torch.Tensor, labels: torch.Tensor, positive: int = 1) -> float:
    """ROC AUC of class `positive` against the rest, scored by its softmax probability (for two
    classes, the difference of the logits: the same ranking, without rounding ties)."""
    _check(logits, labels)
    if logits.shape[1] == 2:
        scores = logits[:, positive].double() - logits[:, 1 - positive].double()
    else:
        scores = logits.double().log_softmax(dim=1)[:, positive]
    return binary_auc(scores, labels == positive)


METRICS = {"top1": lambda lg, lb: top_k(lg, lb, 1), "mean_per_class": mean_per_class, "top1_top5_mean": top1_top5_mean, "roc_auc": roc_auc}


def metric(name: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The metric `name` (a key of METRICS) of these logits and labels."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r} (one of: {', '.join(METRICS)})")
    return METRICS[name](logits, labels)


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"logits must be [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no rows to score")
