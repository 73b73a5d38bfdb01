"""Linear probe: the L-BFGS solution checked by its gradient, the l2 sweep, the split, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.linear_probe import _objective, fit_logistic, holdout_split, linear_probe

SMALL_GRID = (1e-4, 1e-2, 1.0)  # three fits instead of nine keep the tests quick


@pytest.fixture(autouse=True)
def _one_thread():
    # These problems have a few hundred rows: intra-op threads only add hand-off cost, which on a
    # busy two-core machine made this file 15x slower. Restored so no other test is affected.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clusters(n: int, n_classes: int = 5, d: int = 16, spread: float = 10.0, seed: int = 0, probs=None):
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_classes, d, generator=g)  # (C, d): far apart next to unit noise
    if probs is None:
        y = torch.arange(n) % n_classes  # (n,) balanced
    else:
        y = torch.multinomial(torch.tensor(probs), n, replacement=True, generator=g)  # (n,)
    x = means[y] + torch.randn(n, d, generator=g)  # (n, d)
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]


def test_separable_classes_are_all_classified() -> None:
    x, y = _clusters(300)
    r = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=SMALL_GRID)
    assert r["top1"] == 1.0
    assert (r["n_train"], r["n_val"], r["classes"]) == (200, 100, 5)


def test_labels_independent_of_features_score_near_chance() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(700, 16, generator=g)  # (700, 16)
    y = torch.randint(0, 5, (700,), generator=g)
    r = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=SMALL_GRID)
    assert r["top1"] < 0.35  # chance is 0.2 over 500 validation samples
    assert r["n_val"] == 500


def test_held_out_accuracy_chooses_the_strength() -> None:
    # Imbalanced classes: at l2=1e3 the weights shrink to nothing and the unpenalised bias predicts
    # the majority class (about 70%); a light l2 separates the clusters.
    x, y = _clusters(400, n_classes=3, probs=[0.7, 0.15, 0.15], seed=2)
    r = linear_probe(x[:300], y[:300], x[300:], y[300:], l2_grid=(1e3, 1e-3))
    assert r["holdout_top1"][1e-3] == 1.0
    assert r["holdout_top1"][1e3] < 0.85
    assert r["l2"] == 1e-3
    assert r["top1"] == 1.0
    assert list(r["holdout_top1"]) == [1e3, 1e-3]  # grid order kept


def test_equal_held_out_accuracy_goes_to_the_larger_strength() -> None:
    x, y = _clusters(200, seed=3)
    r = linear_probe(x[:150], y[:150], x[150:], y[150:], l2_grid=(1e-2, 1e-4))
    assert r["holdout_top1"] == {1e-2: 1.0, 1e-4: 1.0}
    assert r["l2"] == 1e-2


def test_a_choice_at_the_end_of_the_grid_is_flagged() -> None:
    x, y = _clusters(400, n_classes=3, probs=[0.7, 0.15, 0.15], seed=2)
    inside = linear_probe(x[:300], y[:300], x[300:], y[300:], l2_grid=(1e3, 1e-3, 1e-5))
    assert inside["l2"] == 1e-3 and not inside["at_edge"]  # 1e-5 ties it; the larger strength wins
    edge = linear_probe(x[:300], y[:300], x[300:], y[300:], l2_grid=(1e3, 1e-3))
    assert edge["l2"] == 1e-3 and edge["at_edge"]  # the smallest strength tried: a smaller one may be better


@pytest.mark.parametrize("l2", [1e-4, 1e-1, 1e2])
def test_the_solution_zeroes_the_gradient_of_the_objective(l2: float) -> None:
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(120, 8, generator=g, dtype=torch.float64), dim=-1)  # (120, 8)
    y = torch.randint(0, 4, (120,), generator=g)
    w, b = fit_logistic(x, y, 4, l2)
    assert w.shape == (4, 8) and b.shape == (4,) and w.dtype == torch.float64
    # The oracle is the objective itself, differentiated by autograd, not anything of the optimiser.
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert float(gw.abs().max()) < 1e-6 and float(gb.abs().max()) < 1e-6
    w, b, loss = w.detach(), b.detach(), loss.detach()
    assert abs(float(b.sum())) < 1e-12  # bias returned centred
    # Convex, so a zero gradient is the minimum: no nearby point does better.
    for _ in range(5):
        dw = 1e-3 * torch.randn(4, 8, generator=g, dtype=torch.float64)
        db = 1e-3 * torch.randn(4, generator=g, dtype=torch.float64)
        nearby = F.cross_entropy(x @ (w + dw).T + (b + db), y) + 0.5 * l2 * (w + dw).pow(2).sum()
        assert float(nearby) >= float(loss) - 1e-12


def test_same_seed_same_result_and_the_split_is_stratified() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 16, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=SMALL_GRID, seed=7)
    b = linear_probe(x[:200], y[:200], x[200:], y[200:], l2_grid=SMALL_GRID, seed=7)
    assert a == b

    fit, held = holdout_split(y, 0.2, seed=7)
    fit2, held2 = holdout_split(y, 0.2, seed=7)
    assert torch.equal(fit, fit2) and torch.equal(held, held2)
    assert not torch.equal(held, holdout_split(y, 0.2, seed=8)[1])
    assert torch.equal(torch.cat([fit, held]).sort().values, torch.arange(300))  # a partition
    for c in range(4):
        n_c = int((y == c).sum())
        assert int((y[held] == c).sum()) == round(0.2 * n_c)


def test_every_class_keeps_a_sample_for_fitting() -> None:
    y = torch.tensor([0, 0, 0, 0, 1, 2])  # classes 1 and 2 have one sample each
    fit, held = holdout_split(y, 0.5, seed=0)
    assert set(y[fit].tolist()) == {0, 1, 2}
    assert y[held].tolist() == [0, 0]


def _ok():
    g = torch.Generator().manual_seed(6)
    return torch.randn(20, 4, generator=g), torch.arange(20) % 3, torch.randn(6, 4, generator=g), torch.arange(6) % 3


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "val_x": torch.randn(6, 5)}, "widths differ"),
        (lambda a: {**a, "train_y": a["train_y"][:-1]}, "match the features"),
        (lambda a: {**a, "train_y": torch.zeros(20, dtype=torch.int64)}, "fewer than 2 classes"),
        (lambda a: {**a, "val_y": torch.tensor([0, 1, 2, 3, 0, 1])}, "out of range"),
        (lambda a: {**a, "train_y": torch.arange(20) % 3 - 1}, "non-negative"),
        (lambda a: {**a, "train_y": (torch.arange(20) % 3).float()}, "integer"),
        (lambda a: {**a, "val_x": torch.randn(0, 4), "val_y": torch.zeros(0, dtype=torch.int64)}, "empty"),
        (lambda a: {**a, "train_x": torch.randn(20)}, r"\[n, d\]"),
        (lambda a: {**a, "l2_grid": ()}, "l2_grid"),
        (lambda a: {**a, "l2_grid": (0.0,)}, "l2_grid"),
        (lambda a: {**a, "holdout": 1.0}, "holdout"),
    ],
)
def test_bad_input_is_refused(change, match) -> None:
    tx, ty, vx, vy = _ok()
    args = change({"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy})
    extra = {k: args.pop(k) for k in ("l2_grid", "holdout") if k in args}
    with pytest.raises(ValueError, match=match):
        linear_probe(args["train_x"], args["train_y"], args["val_x"], args["val_y"], **extra)


def test_a_held_out_split_with_nothing_in_it_is_refused() -> None:
    x = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])  # one sample per class: all stay in the fit part
    with pytest.raises(ValueError, match="held-out split is empty"):
        linear_probe(x, y, x, y)


def test_fit_logistic_refuses_a_nonpositive_strength() -> None:
    with pytest.raises(ValueError, match="l2 must be positive"):
        fit_logistic(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), 2, 0.0)


def test_a_warm_start_reaches_the_same_minimiser() -> None:
    x, y = _clusters(300, n_classes=4, seed=7)
    x = F.normalize(x.double(), dim=-1)
    cold_w, cold_b = fit_logistic(x, y, 4, 1e-4)
    start = fit_logistic(x, y, 4, 1e-1)
    warm_w, warm_b = fit_logistic(x, y, 4, 1e-4, init=start)
    # Near-separable clusters at a small l2 make the minimum flat (curvature about l2): the two
    # solutions agree in the objective and in their predictions, and their weights to about
    # tol / l2 (1e-4), as two cold starts from different points would.
    cold, warm = _objective(x, y, cold_w, cold_b, 1e-4), _objective(x, y, warm_w, warm_b, 1e-4)
    assert float(warm) == pytest.approx(float(cold), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(warm_w, cold_w, rtol=0, atol=1e-3)
    assert torch.equal((x @ warm_w.T + warm_b).argmax(-1), (x @ cold_w.T + cold_b).argmax(-1))
    with pytest.raises(ValueError, match="init: expected weight"):
        fit_logistic(x, y, 4, 1e-4, init=(start[0][:2], start[1]))


def test_the_warm_started_sweep_agrees_with_independent_cold_fits() -> None:
    # The oracle is the method without any of the sweep's shortcuts: every strength fitted from
    # zero on the fit split, the best held-out top-1 chosen (ties to the larger), refitted cold.
    g = torch.Generator().manual_seed(8)
    means = 1.5 * torch.randn(4, 12, generator=g)
    y = torch.randint(0, 4, (260,), generator=g)
    x = means[y] + torch.randn(260, 12, generator=g)  # overlapping classes: the strength matters
    grid = (1e-4, 1e-2, 1.0)
    r = linear_probe(x[:160], y[:160], x[160:], y[160:], l2_grid=grid)
    xtr, xva = F.normalize(x[:160].double(), dim=-1), F.normalize(x[160:].double(), dim=-1)
    fit, held = holdout_split(y[:160], 0.2, 0)
    scores = {}
    for l2 in grid:
        w, b = fit_logistic(xtr[fit], y[:160][fit], 4, l2)
        scores[l2] = float(((xtr[held] @ w.T + b).argmax(-1) == y[:160][held]).double().mean())
    chosen = max(l2 for l2, s in scores.items() if s == max(scores.values()))
    w, b = fit_logistic(xtr, y[:160], 4, chosen)
    assert r["holdout_top1"] == scores and r["l2"] == chosen
    assert r["top1"] == float(((xva @ w.T + b).argmax(-1) == y[160:]).double().mean())


def test_a_small_probe_runs_on_one_thread_and_gives_the_count_back(monkeypatch) -> None:
    # On a busy two-core machine each hand-off to a second intra-op thread waits for a core:
    # an 81-image probe took 230 s instead of 9 s.
    from evaluation import linear_probe as lp

    seen = []
    objective = lp._objective

    def recording(*args):
        seen.append(torch.get_num_threads())
        return objective(*args)

    monkeypatch.setattr(lp, "_objective", recording)
    torch.set_num_threads(2)  # the autouse fixture restores its own count afterwards
    x, y = _clusters(120)
    linear_probe(x[:90], y[:90], x[90:], y[90:], l2_grid=SMALL_GRID)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
