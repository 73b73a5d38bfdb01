"""Every backend against numbers written out by hand, plus gradients and API.

Hand cases use b=2, d=2 vectors whose normalised dot products are 0, +-1, 0.6 or 0.8, so
each row's loss is a log-sum-exp of a few numbers spelled out below. Each test runs once
per fp64-capable backend, with that backend as the functions' default.
"""
import math

import pytest
import torch

from kernels import contrastive


def lse(*v: float) -> float:
    return math.log(sum(math.exp(t) for t in v))


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# Un-normalised on purpose: the loss must normalise them.
IMAGE = t64([[2, 0], [0, 5]])  # -> x1 = (1, 0), x2 = (0, 1)
TEXT = t64([[3, 4], [0, -2]])  # -> y1 = (0.6, 0.8), y2 = (0, -1)
AUG1 = t64([[3, 0], [0, 0.5]])  # -> a1 = (1, 0), a2 = (0, 1)
AUG2 = t64([[3, 4], [-2, 0]])  # -> b1 = (0.6, 0.8), b2 = (-1, 0)
S = 2.0  # logit scale
T = 0.5  # temperature


# triton computes in fp32 whatever the input; its own tests hold it to fp32 tolerances.
@pytest.fixture(autouse=True, params=[b for b in contrastive.BACKENDS if b != "triton"])
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    for fn in (contrastive.clip_loss, contrastive.simclr_loss, contrastive.slip_loss):
        monkeypatch.setitem(fn.__kwdefaults__, "backend", request.param)
    return request.param


def clip_by_hand() -> float:
    # x.y: x1y1 = 0.6, x1y2 = 0, x2y1 = 0.8, x2y2 = -1; logits are S times these.
    i2t = [lse(1.2, 0.0) - 1.2, lse(1.6, -2.0) - (-2.0)]
    t2i = [lse(1.2, 1.6) - 1.2, lse(0.0, -2.0) - (-2.0)]
    return (sum(i2t) / 2 + sum(t2i) / 2) / 2


def simclr_by_hand() -> float:
    # a.b: a1b1 = 0.6, a1b2 = -1, a2b1 = 0.8, a2b2 = 0; a1a2 = 0; b1b2 = -0.6; divided by T.
    # Each row: [its view-b (or a) candidates..., its own view's others]; the self entry
    # is masked out, so it is absent from the sums.
    row_a1 = lse(1.2, -2.0, 0.0) - 1.2  # ab: 1.2, -2 | aa: (masked), 0
    row_a2 = lse(1.6, 0.0, 0.0) - 0.0  # ab: 1.6, 0 | aa: 0, (masked)
    row_b1 = lse(1.2, 1.6, -1.2) - 1.2  # ba: 1.2, 1.6 | bb: (masked), -1.2
    row_b2 = lse(-2.0, 0.0, -1.2) - 0.0  # ba: -2, 0 | bb: -1.2, (masked)
    return ((row_a1 + row_a2) / 2 + (row_b1 + row_b2) / 2) / 2


def test_clip_by_hand():
    out = contrastive.clip_loss(IMAGE, TEXT, t64([S]))
    assert set(out) == {"loss", "clip_loss", "clip_acc"}
    assert out["loss"].item() == pytest.approx(clip_by_hand(), abs=1e-12)
    assert out["clip_loss"].item() == pytest.approx(clip_by_hand(), abs=1e-12)
    # i2t row 1: argmax(1.2, 0) = 0, right; row 2: argmax(1.6, -2) = 0, wrong.
    assert out["clip_acc"].item() == pytest.approx(50.0)


def test_simclr_by_hand_masks_self():
    out = contrastive.simclr_loss(AUG1, AUG2, T)
    assert set(out) == {"loss", "ssl_loss", "ssl_acc"}
    assert out["loss"].item() == pytest.approx(simclr_by_hand(), abs=1e-12)
    # Had the diagonal of aa counted (a_i.a_i / T = 2), row a1 would read:
    unmasked_a1 = lse(1.2, -2.0, 2.0, 0.0) - 1.2
    assert unmasked_a1 != pytest.approx(lse(1.2, -2.0, 0.0) - 1.2)
    # a1: argmax(1.2, -2, masked, 0) = 0, right; a2: argmax(1.6, 0, 0, masked) = 0, wrong.
    # Unmasked, a1's own entry (2.0) would win and the accuracy would be 0.
    assert out["ssl_acc"].item() == pytest.approx(50.0)


@pytest.mark.parametrize("ssl_scale", [1.0, 0.5])
def test_slip_is_clip_plus_scaled_ssl(ssl_scale):
    out = contrastive.slip_loss(IMAGE, TEXT, t64([S]), AUG1, AUG2, ssl_scale=ssl_scale, ssl_temp=T)
    assert set(out) == {"loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc"}
    assert out["clip_loss"].item() == pytest.approx(clip_by_hand(), abs=1e-12)
    assert out["ssl_loss"].item() == pytest.approx(simclr_by_hand(), abs=1e-12)
    want = clip_by_hand() + ssl_scale * simclr_by_hand()
    assert out["loss"].item() == pytest.approx(want, abs=1e-12)
    assert out["clip_acc"].item() == pytest.approx(50.0)
    assert out["ssl_acc"].item() == pytest.approx(50.0)


def test_accuracy_all_right_when_identical_and_separated():
    e = 3.0 * torch.eye(6)  # (6, 6): orthogonal rows, each matches only itself
    out = contrastive.slip_loss(e, e.clone(), torch.tensor([10.0]), e.clone(), e.clone())
    assert out["clip_acc"].item() == 100.0
    assert out["ssl_acc"].item() == 100.0
    assert not out["clip_acc"].requires_grad and not out["ssl_acc"].requires_grad


def test_accuracy_counts_wrong_rows():
    e = torch.eye(5)  # (5, 5)
    shuffled = e[[1, 2, 0, 3, 4]]  # rows 0..2 cycled: those three rows pick the wrong column
    out = contrastive.slip_loss(e, shuffled, torch.tensor([10.0]), e.clone(), shuffled.clone())
    assert out["clip_acc"].item() == pytest.approx(40.0)
    assert out["ssl_acc"].item() == pytest.approx(40.0)


def test_zero_scale_gives_uniform_logits():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    out = contrastive.clip_loss(x, y, torch.tensor([0.0]))
    assert out["loss"].item() == pytest.approx(math.log(7), rel=1e-6)
    # Huge temperature: every non-masked logit is ~0, so each row is log(2B - 1).
    out = contrastive.simclr_loss(x, y, 1e9)
    assert out["loss"].item() == pytest.approx(math.log(2 * 7 - 1), rel=1e-6)


def test_scale_sharpens_and_embedding_norm_is_irrelevant():
    e = torch.eye(4) + 0.1  # (4, 4): each row closest to itself
    losses = [contrastive.clip_loss(e, e, torch.tensor([s]))["loss"].item() for s in (1.0, 10.0, 20.0)]
    assert losses[0] > losses[1] > losses[2] > 0
    temps = [contrastive.simclr_loss(e, e, t)["loss"].item() for t in (1.0, 0.3, 0.1)]
    assert temps[0] > temps[1] > temps[2] > 0
    scaled = contrastive.clip_loss(7.0 * e, 0.3 * e, torch.tensor([10.0]))["loss"].item()
    assert scaled == pytest.approx(losses[1], rel=1e-6)
    # Same numbers as cross-entropy over s * cos written directly with torch.
    assert contrastive.clip_loss(e, e, torch.tensor([3.0]))["loss"].item() == pytest.approx(
        clip_with_torch(e, 3.0), rel=1e-6
    )


def clip_with_torch(e: torch.Tensor, s: float) -> float:
    n = torch.nn.functional.normalize(e, dim=-1)
    logits = s * n @ n.T  # (b, b), image and text identical
    labels = torch.arange(e.shape[0])
    ce = torch.nn.functional.cross_entropy
    return ((ce(logits, labels) + ce(logits.T, labels)) / 2).item()


def test_low_precision_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(4, 8, generator=g).bfloat16()
    out = contrastive.clip_loss(x, y, torch.tensor([5.0]))
    assert out["loss"].dtype == torch.float32
    ref = contrastive.clip_loss(x.float(), y.float(), torch.tensor([5.0]))
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-6)


def test_gradcheck_slip():
    g = torch.Generator().manual_seed(2)
    b, d, d_ssl = 3, 4, 5
    inputs = (
        torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True),  # image
        torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True),  # text
        torch.tensor([2.5], dtype=torch.float64, requires_grad=True),  # logit_scale
        torch.randn(b, d_ssl, generator=g, dtype=torch.float64, requires_grad=True),  # aug1
        torch.randn(b, d_ssl, generator=g, dtype=torch.float64, requires_grad=True),  # aug2
    )

    def f(*args):
        return contrastive.slip_loss(*args, ssl_scale=0.7, ssl_temp=0.3)["loss"]

    assert torch.autograd.gradcheck(f, inputs)
    f(*inputs).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)


def test_gradcheck_clip_and_simclr():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: contrastive.clip_loss(x, y, s)["loss"], (x, y, s))
    assert torch.autograd.gradcheck(lambda x, y: contrastive.simclr_loss(x, y, 0.2)["loss"], (x, y))


def test_logit_scale_gradient_sign():
    e = torch.eye(4) + 0.1  # aligned pairs: a sharper scale lowers the loss
    s = torch.tensor([2.0], requires_grad=True)
    contrastive.clip_loss(e, e, s)["loss"].backward()
    assert s.grad.shape == (1,) and s.grad.item() < 0


def test_unknown_backend_is_named():
    assert "reference" in contrastive.BACKENDS
    with pytest.raises(ValueError, match="no_such_backend") as err:
        contrastive.clip_loss(IMAGE, TEXT, t64([S]), backend="no_such_backend")
    assert "reference" in str(err.value)
    for call in (
        lambda: contrastive.simclr_loss(AUG1, AUG2, T, backend="nope"),
        lambda: contrastive.slip_loss(IMAGE, TEXT, t64([S]), AUG1, AUG2, backend="nope"),
    ):
        with pytest.raises(ValueError, match="nope"):
            call()


def test_bad_shapes_and_temperature():
    with pytest.raises(ValueError, match="same b"):
        contrastive.clip_loss(IMAGE, TEXT[:1], t64([S]))
    with pytest.raises(ValueError, match="temperature"):
        contrastive.simclr_loss(AUG1, AUG2, 0.0)
