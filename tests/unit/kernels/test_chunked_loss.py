"""The `chunked` backend against the `reference` oracle: forward, backward, accuracies, memory.

Tiles are made smaller than the batches (and not dividing them) so that every path of the
online log-sum-exp and of the tiled backward runs: several row and column tiles, a positive
and a masked self-candidate in a tile other than the first.
"""
import pytest
import torch

from kernels import chunked, contrastive

PARTS = ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc")


@pytest.fixture(params=[(4, 5), (7, 3), (1024, 4096)], ids=["tiles-4x5", "tiles-7x3", "tiles-default"])
def tiles(request, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    monkeypatch.setattr(chunked, "ROWS", request.param[0])
    monkeypatch.setattr(chunked, "COLS", request.param[1])
    return request.param


def _run(backend: str, emb: dict[str, torch.Tensor], logit_scale: torch.Tensor, temp: float) -> tuple[dict, dict]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in {**emb, "logit_scale": logit_scale}.items()}
    out = contrastive.slip_loss(
        leaves["image"], leaves["text"], leaves["logit_scale"], leaves["aug1"], leaves["aug2"],
        ssl_scale=0.7, ssl_temp=temp, backend=backend,
    )
    out["loss"].backward()
    return {k: out[k].detach() for k in PARTS}, {k: v.grad for k, v in leaves.items()}


def _embeddings(b: int, d: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, d, generator=g).to(dtype) for k in ("image", "text", "aug1", "aug2")}  # each (b, d)


@pytest.mark.parametrize("b", [1, 2, 13, 37])
@pytest.mark.parametrize(("d", "temp", "scale"), [(5, 0.1, 14.3), (16, 0.07, 100.0), (8, 1.0, 1.0)])
def test_matches_reference_in_fp64(tiles, b: int, d: int, temp: float, scale: float) -> None:
    emb = _embeddings(b, d, torch.float64, seed=b * 100 + d)
    logit_scale = torch.tensor([scale], dtype=torch.float64)
    want_parts, want_grads = _run("reference", emb, logit_scale, temp)
    parts, grads = _run("chunked", emb, logit_scale, temp)
    for k in PARTS:
        torch.testing.assert_close(parts[k], want_parts[k], rtol=1e-12, atol=1e-12, msg=k)
    for k in want_grads:
        torch.testing.assert_close(grads[k], want_grads[k], rtol=1e-10, atol=1e-13, msg=k)


@pytest.mark.parametrize("b", [13, 64, 300])
def test_matches_reference_in_fp32(tiles, b: int) -> None:
    emb = _embeddings(b, 32, torch.float32, seed=b)
    logit_scale = torch.tensor([20.0])
    want_parts, want_grads = _run("reference", emb, logit_scale, 0.1)
    parts, grads = _run("chunked", emb, logit_scale, 0.1)
    for k in PARTS:
        torch.testing.assert_close(parts[k], want_parts[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in want_grads:
        scale = want_grads[k].abs().max()
        torch.testing.assert_close(grads[k] / scale, want_grads[k] / scale, rtol=1e-5, atol=1e-5, msg=k)


def test_bf16_embeddings_are_computed_in_fp32_like_the_reference(tiles) -> None:
    emb = _embeddings(40, 24, torch.bfloat16, seed=3)
    want_parts, want_grads = _run("reference", emb, torch.tensor([10.0]), 0.2)
    parts, grads = _run("chunked", emb, torch.tensor([10.0]), 0.2)
    for k in PARTS:
        torch.testing.assert_close(parts[k], want_parts[k], rtol=1e-5, atol=1e-5, msg=k)
    for k in want_grads:
        assert grads[k].dtype == want_grads[k].dtype
        torch.testing.assert_close(grads[k].float(), want_grads[k].float(), rtol=2e-2, atol=1e-3, msg=k)  # bf16 grads


def test_gradcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "ROWS", 3)
    monkeypatch.setattr(chunked, "COLS", 4)
    emb = _embeddings(7, 4, torch.float64, seed=11)
    inputs = [v.requires_grad_(True) for v in emb.values()] + [torch.tensor([3.0], dtype=torch.float64, requires_grad=True)]

    def loss(x, y, a, b, s):
        return contrastive.slip_loss(x, y, s, a, b, ssl_temp=0.3, backend="chunked")["loss"]

    assert torch.autograd.gradcheck(loss, inputs)


def test_ties_pick_the_first_maximum_like_argmax(tiles) -> None:
    # Identical candidates: every row's top-1 is its first, as torch.argmax reports it.
    x = torch.ones(9, 4, dtype=torch.float64)
    for backend in ("reference", "chunked"):
        out = contrastive.clip_loss(x, x, torch.tensor([5.0], dtype=torch.float64), backend=backend)
        assert out["clip_acc"].item() == pytest.approx(100 / 9)


def test_nothing_batch_by_batch_is_saved_for_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # What autograd keeps between forward and backward grows with (b + B) d, never with b * B.
    monkeypatch.setattr(chunked, "ROWS", 64)
    monkeypatch.setattr(chunked, "COLS", 64)
    b, d = 512, 16
    emb = {k: v.requires_grad_(True) for k, v in _embeddings(b, d, torch.float32, seed=5).items()}
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        contrastive.slip_loss(emb["image"], emb["text"], torch.tensor([10.0]), emb["aug1"], emb["aug2"], backend="chunked")
    assert max(saved) <= 2 * b * d  # the concatenated SimCLR candidates, (2B, d)
    assert sum(saved) < 40 * b * d  # against b * B = 32 * b * d for a single logits matrix here


def test_profile_loss_reports_each_backend_side_by_side(capsys: pytest.CaptureFixture) -> None:
    import json

    from slip.main import main

    assert main(["profile", "loss", "--batch", "96", "--dim", "32", "--backend", "reference,chunked", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["batch"] == 96 and r["dim"] == 32 and set(r["backends"]) == {"reference", "chunked"}
    ref, chunk = r["backends"]["reference"], r["backends"]["chunked"]
    assert ref["seconds"] > 0 and chunk["seconds"] > 0 and ref["extra_peak_bytes"] >= 0
    # A 96 x 96 loss needs well under a MB: the peak is the loss's, not a start-up transient's.
    assert ref["extra_peak_bytes"] < 64 * 2**20 and chunk["extra_peak_bytes"] < 64 * 2**20
    assert chunk["time_ratio"] == pytest.approx(chunk["seconds"] / ref["seconds"])
    assert chunk["loss"] == pytest.approx(ref["loss"], rel=1e-5)  # the same inputs in both processes
    assert main(["profile", "loss", "--batch", "8", "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [20.0])
def test_a_nearly_zero_loss_keeps_its_digits(tiles, scale: float) -> None:
    # The positive dominates every row: the loss (~1e-6) is below the rounding of the
    # log-sum-exp itself (~2e-6 at 20), so lse - positive alone would give 0 or 2e-6. In fp32
    # both backends are then limited by log(1 + tiny) to about 1e-7 absolute.
    e = torch.eye(6) + 0.1  # (6, 6)
    truth = contrastive.slip_loss(e.double(), e.double(), torch.tensor([scale], dtype=torch.float64), e.double(), e.double(),
                                  ssl_temp=1 / scale, backend="reference")  # fmt: skip
    for backend in ("reference", "chunked"):
        got = contrastive.slip_loss(e, e, torch.tensor([scale]), e, e, ssl_temp=1 / scale, backend=backend)
        for k in ("clip_loss", "ssl_loss"):
            assert truth[k].item() > 6e-7  # so that a plain 0 fails
            assert abs(got[k].item() - truth[k].item()) < 4e-7, (backend, k, got[k].item(), truth[k].item())
