"""The zero-shot table's metrics against hand-computed cases."""
import pytest
import torch

from evaluation.metrics import binary_auc, mean_per_class, metric, roc_auc, top1_top5_mean, top_k


def _logits(rankings: list[list[int]], n_classes: int) -> torch.Tensor:
    """Rows whose classes rank in the given order (first = highest), the rest below."""
    out = torch.zeros(len(rankings), n_classes) - 100 + torch.rand(len(rankings), n_classes)
    for i, order in enumerate(rankings):
        for r, c in enumerate(order):
            out[i, c] = 10.0 - r
    return out


def test_top_k_by_hand() -> None:
    # Six rows over 7 classes; row i's label sits at rank (1, 1, 2, 3, 5, 6) of its row.
    logits = _logits([[0], [1], [2, 3], [5, 6, 4], [0, 1, 2, 3, 6], [6, 5, 4, 3, 2, 1]], 7)
    labels = torch.tensor([0, 1, 3, 4, 6, 1])
    assert top_k(logits, labels, 1) == pytest.approx(2 / 6)
    assert top_k(logits, labels, 5) == pytest.approx(5 / 6)
    assert top_k(logits, labels, 99) == 1.0  # k beyond the classes: every label is in
    assert top1_top5_mean(logits, labels) == pytest.approx((2 / 6 + 5 / 6) / 2)
    assert metric("top1", logits, labels) == pytest.approx(2 / 6)


def test_mean_per_class_weights_classes_not_rows() -> None:
    # Class 0: 4 rows, 3 right; class 1: 1 row, wrong; class 2: 1 row, right; class 3: no rows (predicted once).
    logits = _logits([[0], [0], [0], [3], [0], [2]], 4)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    assert mean_per_class(logits, labels) == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert top_k(logits, labels, 1) == pytest.approx(4 / 6)  # what plain top-1 says instead


def test_binary_auc_by_hand_with_ties() -> None:
    # Positives score 0.9, 0.5, 0.3; negatives 0.5, 0.2. Pairs (pos > neg): 0.9 beats both (2),
    # 0.5 ties 0.5 (1/2) and beats 0.2 (1), 0.3 beats 0.2 (1): 4.5 of 6.
    scores = torch.tensor([0.9, 0.5, 0.5, 0.3, 0.2])
    positive = torch.tensor([1, 1, 0, 1, 0])
    assert binary_auc(scores, positive) == pytest.approx(4.5 / 6)
    perm = torch.randperm(5)  # the order of the rows does not matter
    assert binary_auc(scores[perm], positive[perm]) == pytest.approx(4.5 / 6)
    assert binary_auc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 0, 0])) == 0.5  # all tied: chance
    assert binary_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    with pytest.raises(ValueError, match="needs both classes"):
        binary_auc(torch.rand(4), torch.ones(4))


def test_roc_auc_scores_class_one_from_two_logits() -> None:
    base = torch.randn(5)
    # Class-1 margins (logit1 - logit0): 2, 0, 0, -1, -3 with labels 1, 1, 0, 0, 1:
    # positives 2, 0, -3 against negatives 0, -1: 2 wins 2, 0 ties 0 and beats -1 (1.5), -3 loses both: 3.5 of 6.
    margin = torch.tensor([2.0, 0.0, 0.0, -1.0, -3.0])
    logits = torch.stack([base, base + margin], dim=1)
    labels = torch.tensor([1, 1, 0, 0, 1])
    assert roc_auc(logits, labels) == pytest.approx(3.5 / 6)
    assert metric("roc_auc", logits, labels) == pytest.approx(3.5 / 6)
    assert roc_auc(logits, labels, positive=0) == pytest.approx(3.5 / 6)  # both scores and labels flip: the same area


def test_bad_shapes_and_names_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        top_k(torch.rand(3, 4), torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="unknown metric 'top7'"):
        metric("top7", torch.rand(2, 2), torch.tensor([0, 1]))
