"""Linear probe on frozen image features, as CLIP and SLIP report it.

A multinomial logistic-regression classifier is fitted on training-set features with full-batch
L-BFGS; its L2 strength is chosen on a held-out part of the training features, then the classifier
is refitted on all of them with that strength, and top-1 is measured on the validation features.
CLIP's probe used scikit-learn's ``LogisticRegression`` (L-BFGS, 1000 iterations, C swept on a log
grid); this is the same convex objective solved in torch, so no scikit-learn is needed and the
features may stay on the GPU.

Objective, for weight W [C, d] and bias b [C]:

    mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||_F^2

The bias is not penalised (as in scikit-learn's lbfgs solver). scikit-learn's C maps to
``l2 = 1 / (n * C)``, since it minimises ``||W||^2 / 2 + C * sum_i CE``.

`linear_probe` takes feature tensors; `eval_linear` extracts them from two labelled image sets first.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.encoder import ImageEncoder, dali_device, progress
from evaluation.features import image_features, require_images
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import LabelledImages, Skipped, labelled_images

# Eleven strengths, a decade apart. On L2-normalised features 1e-8 is unregularised for any
# training set up to ImageNet's size (weak models on small sets chose 1e-6 in our runs), and at
# 1e2 the weights are so small that the classifier is little more than the class means (plus
# the unpenalised bias's priors), so the grid spans both ends.
# A choice at either end is reported (`at_edge`): the best strength may lie beyond it.
DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-8, 3))

# scipy's L-BFGS keeps 10 correction pairs (scikit-learn's default); torch's default of 100 would
# hold 200 copies of a [C, d] float64 matrix, 1.2 GB for 1000 classes x 768 dims.
_HISTORY = 10

# Multiply-adds of one product of the (n, d) features with the (d, C) weights below which the
# probe runs on one CPU thread (about a millisecond's work).
_SMALL_WORK = 1 << 22


def _check_labels(labels: torch.Tensor, n: int, what: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{what} labels: expected shape [{n}] to match the features, got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{what} labels: expected an integer tensor, got {labels.dtype}")


def _check_features(features: torch.Tensor, what: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{what} features: expected shape [n, d], got {list(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{what} features: the split is empty")
    if not features.dtype.is_floating_point:
        raise ValueError(f"{what} features: expected a floating-point tensor, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{what} features: contain NaN or infinity")


def _objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float) -> torch.Tensor:
    logits = x @ weight.T + bias  # (n, C)
    return F.cross_entropy(logits, y) + 0.5 * l2 * weight.pow(2).sum()


@contextlib.contextmanager
def _threads_for(work: int, device: torch.device) -> Iterator[None]:
    """One intra-op thread for a small problem on the CPU. Its ops take microseconds; on a busy
    machine each hand-off to a second thread waits for a core, which made an 81-image probe take
    28 ms per evaluation instead of 1 ms (230 s against 9 s)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or work > _SMALL_WORK or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    l2: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-8,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE + l2/2 ||W||^2`` over (W, b); returns weight [C, d] and bias [C] in float64.

    features: [n, d] float, used as given (``linear_probe`` L2-normalises them first; a caller of
    this function predicts with ``features @ weight.T + bias`` on features prepared the same way).
    labels: [n] int64 in [0, n_classes).

    Full-batch L-BFGS with a strong-Wolfe line search in float64, from zero (or from ``init``, a
    (weight, bias) such as the solution at a nearby l2: the minimiser is the same, it is only
    reached in fewer iterations), stopping when the
    largest gradient component is at most ``tol`` or after ``max_iter`` iterations (CLIP's budget
    was 1000). ``l2 > 0`` makes the objective strictly convex in W, so the weight is unique; the
    bias is unique only up to a common shift, which softmax ignores, so it is returned centred
    (mean zero). Deterministic: no randomness, so the same inputs on the same machine give the same
    result. Runs on the features' device; memory is the float64 copy of the features plus a few
    [n, C] logit buffers.
    """
    _check_features(features, "training")
    n, d = features.shape
    _check_labels(labels, n, "training")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got n_classes={n_classes}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be positive and finite (without it separable data has no minimiser), got {l2}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")

    # float64: float32 round-off (about 1e-7 relative) lies above a 1e-8 gradient tolerance, and with
    # l2 down to 1e-6 the problem is ill-conditioned enough for that to matter.
    x = features.detach().to(torch.float64)  # (n, d)
    y = labels.detach().to(device=x.device, dtype=torch.int64)  # (n,)
    # Diagonal preconditioning, W = scale * V. The bias block of the Hessian is the softmax
    # curvature alone (p(1-p) <= 1/4 per logit); the W block adds l2 to it (times |x|^2, 1 for
    # unit rows). Without the rescaling a large l2 makes the two blocks differ by 1 + 4*l2 and
    # L-BFGS crawls (about 2000 evaluations at l2=1e3 against about 10 with it). The minimiser is
    # the same; the tolerance is scaled so that the gradient in W still meets tol.
    scale = (1.0 + 4.0 * l2) ** -0.5
    if init is None:
        v = torch.zeros(n_classes, d, dtype=torch.float64, device=x.device)  # (C, d)
        bias = torch.zeros(n_classes, dtype=torch.float64, device=x.device)  # (C,)
    else:
        v = init[0].detach().to(device=x.device, dtype=torch.float64) / scale  # (C, d)
        bias = init[1].detach().to(device=x.device, dtype=torch.float64).clone()  # (C,)
        if v.shape != (n_classes, d) or bias.shape != (n_classes,):
            raise ValueError(f"init: expected weight [{n_classes}, {d}] and bias [{n_classes}], got {list(v.shape)} and {list(bias.shape)}")
    v.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [v, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,  # the line search may take a few evaluations per iteration
        tolerance_grad=tol * scale,  # on V's gradient, which is scale * W's
        # Stop for lack of progress only when there is none at all (a zero step, or no descent
        # direction left at round-off); otherwise the gradient test or the budget ends it.
        tolerance_change=0.0,
        history_size=_HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _objective(x, y, v * scale, bias, l2)
        loss.backward()
        return loss

    with _threads_for(n * d * n_classes, x.device):
        opt.step(closure)  # one call runs up to max_iter iterations
    weight = v.detach() * scale  # (C, d)
    bias = bias.detach()  # (C,)
    return weight, bias - bias.mean()


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified split of ``range(len(labels))`` into (fit, held_out) index tensors.

    Per class (in label order), a seeded permutation of its samples; the first
    ``round(fraction * n_class)`` go to held_out, but at least one sample of every class stays in
    fit, so the classifier sees every class. Both index tensors are sorted, int64, on the CPU.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {fraction}")
    labels = labels.detach().cpu()
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in torch.unique(labels).tolist():  # sorted, so the generator is consumed in a fixed order
        idx = torch.nonzero(labels == c).flatten()  # (n_c,)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(round(fraction * len(idx)), len(idx) - 1)
        held.append(idx[:k])
        fit.append(idx[k:])
    fit_idx = torch.cat(fit).sort().values if fit else torch.empty(0, dtype=torch.int64)
    held_idx = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    return fit_idx, held_idx


def _top1(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    pred = (x @ weight.T + bias).argmax(dim=-1)  # (n,); argmax breaks ties towards the lower class
    return float((pred == y.to(pred.device)).double().mean())


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    l2_grid: Sequence[float] | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    n_classes: int | None = None,
    max_iter: int = 1000,
) -> dict:
    """Linear-probe top-1 of frozen features.

    train_x: [n_train, d], train_y: [n_train] int64; val_x: [n_val, d], val_y: [n_val] int64.
    n_classes defaults to ``max(train_y) + 1``; validation labels must lie below it.

    For every l2 in ``l2_grid`` (default ``DEFAULT_L2_GRID``) a classifier is fitted on the fit
    part of a stratified split of the training features (``holdout_split``) and scored on the
    held-out part; the best held-out top-1 wins, ties going to the larger l2 (the more regularised
    of equally accurate models, and independent of grid order). The classifier is then refitted on
    all training features with that l2 and scored on the validation features.

    Returns {"top1": fraction in 0..1, "l2": chosen, "at_edge": whether it is the grid's smallest
    or largest value, "holdout_top1": {l2: held-out top-1} in grid
    order, "n_train", "n_val", "classes"}.
    """
    _check_features(train_x, "training")
    _check_features(val_x, "validation")
    if train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"feature widths differ: training d={train_x.shape[1]}, validation d={val_x.shape[1]}")
    _check_labels(train_y, train_x.shape[0], "training")
    _check_labels(val_y, val_x.shape[0], "validation")
    if int(train_y.min()) < 0 or int(val_y.min()) < 0:
        raise ValueError("labels must be non-negative")
    if torch.unique(train_y).numel() < 2:
        raise ValueError("the training features hold fewer than 2 classes")
    if n_classes is None:
        n_classes = int(train_y.max()) + 1
    if int(train_y.max()) >= n_classes or int(val_y.max()) >= n_classes:
        raise ValueError(
            f"labels out of range: classes are [0, {n_classes}), training max {int(train_y.max())}, "
            f"validation max {int(val_y.max())}"
        )
    grid = list(DEFAULT_L2_GRID if l2_grid is None else l2_grid)
    if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
        raise ValueError(f"l2_grid must be a non-empty list of positive finite values, got {grid}")

    # L2-normalised, not standardised: the contrastive objective trained these features to be
    # compared by cosine, so their length carries no signal the model meant; and with every row
    # of unit length one l2 grid means the same thing for every backbone and width. Standardising
    # would rescale each dimension by training statistics, distorting that geometry and leaving
    # the grid's meaning dependent on the feature scale. (CLIP fed raw features and swept C wider,
    # 1e-6..1e6, to cover unknown scales.) Rows are independent, so no statistic leaks from val.
    xtr = F.normalize(train_x.detach().to(torch.float64), dim=-1)  # (n_train, d)
    xva = F.normalize(val_x.detach().to(torch.float64), dim=-1)  # (n_val, d)
    ytr = train_y.detach().to(device=xtr.device, dtype=torch.int64)  # (n_train,)
    yva = val_y.detach().to(device=xva.device, dtype=torch.int64)  # (n_val,)

    fit_idx, held_idx = holdout_split(ytr, holdout, seed)
    if held_idx.numel() == 0:
        raise ValueError(
            f"the held-out split is empty: holdout={holdout} of {len(ytr)} training samples leaves none "
            "once every class keeps one sample for fitting"
        )
    fit_idx, held_idx = fit_idx.to(xtr.device), held_idx.to(xtr.device)

    scores: dict[float, float] = {}
    x_fit, y_fit, x_held, y_held = xtr[fit_idx], ytr[fit_idx], xtr[held_idx], ytr[held_idx]  # indexed once, not per strength
    # Along the regularisation path, strongest first, each fit starting from the previous
    # solution: the weights grow as l2 falls, and a warm start saves most of the iterations.
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    previous = None
    strengths = sorted(set(grid), reverse=True)
    with _threads_for(xtr.numel() * n_classes, xtr.device), progress(total=len(strengths) + 1, desc="linear probe: l2 sweep", unit="fit") as bar:
        for l2 in strengths:
            bar.set_postfix_str(f"l2={l2:g}")
            previous = solutions[l2] = fit_logistic(x_fit, y_fit, n_classes, l2, max_iter=max_iter, init=previous)
            bar.update()
        del x_fit
        for l2 in grid:  # reported in the caller's order
            scores[l2] = _top1(x_held, y_held, *solutions[l2])
        best = max(scores.values())
        chosen = max(l2 for l2, s in scores.items() if s == best)  # accuracies share a denominator: == is exact
        bar.set_postfix_str(f"refit at l2={chosen:g}")
        w, b = fit_logistic(xtr, ytr, n_classes, chosen, max_iter=max_iter, init=solutions[chosen])
        bar.update()
    del solutions, y_fit, x_held, y_held
    return {
        "top1": _top1(xva, yva, w, b),
        "l2": chosen,
        "at_edge": len(grid) > 1 and chosen in (min(grid), max(grid)),
        "holdout_top1": scores,
        "n_train": int(xtr.shape[0]),
        "n_val": int(xva.shape[0]),
        "classes": n_classes,
    }


def _labelled_features(encoder: ImageEncoder, augment: AugmentConfig, data: LabelledImages, batch_size: int, threads: int, desc: str,
                       skipped: Skipped) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    mine = Skipped()
    batches = data.batches(augment, batch_size=batch_size, threads=threads, skipped=mine, **dali_device(encoder))
    x, y = image_features(encoder, batches, -(-data.n_images // batch_size), desc)
    require_images(len(x), data.path, mine)
    skipped.extend(mine)
    return x, y


def eval_linear(
    encoder: ImageEncoder,
    augment: AugmentConfig,
    train: str | Path,
    val: str | Path,
    *,
    batch_size: int = 256,
    threads: int = 2,
    l2_grid: list[float] | None = None,
) -> dict:
    """A logistic regression on the encoder's frozen image features of two labelled sets (class-per-folder
    trees or `slip convert classes` output). SLIP's probe reads the image tower before any projection:
    pass `ImageTower(model.visual)`. Images that cannot be decoded are left out of either set and
    counted in "skipped" and "skipped_first" (`Skipped.report`)."""
    train_set, val_set = labelled_images(train), labelled_images(val)
    if train_set.classes != val_set.classes:
        raise ValueError(f"{train} and {val} have different classes")
    skipped = Skipped()
    train_x, train_y = _labelled_features(encoder, augment, train_set, batch_size, threads, "linear probe: train features", skipped)
    val_x, val_y = _labelled_features(encoder, augment, val_set, batch_size, threads, "linear probe: val features", skipped)
    result = linear_probe(train_x, train_y, val_x, val_y, l2_grid=l2_grid, n_classes=len(train_set.classes))
    return {**result, **skipped.report()}
