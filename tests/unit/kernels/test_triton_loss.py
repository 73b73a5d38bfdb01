"""The `triton` backend's fused kernels against the `reference` oracle.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1),
the same code the GPU compiles, with 16-wide tiles; on a CUDA machine the tensors are made on
the GPU and the compiled kernels run. Batches and widths are chosen across the interpreted
block sizes (16): one partial block, several blocks and slices with a partial last one,
widths below and above one block of the embedding dimension.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import contrastive, reference, triton_lse

PARTS = ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SSL_SCALE = 0.7


def _run(backend, emb: dict[str, torch.Tensor], scale: float, temp: float) -> tuple[dict, dict]:
    """(loss parts, gradients) of SLIP through the API with `backend` (a name) or through
    `backend(leaves, logit_scale, temp)` (an oracle)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
    s = torch.tensor([scale], dtype=emb["image"].dtype if emb["image"].dtype != torch.bfloat16 else torch.float32, device=DEVICE)
    s.requires_grad_(True)
    if callable(backend):
        out = backend(leaves, s, temp)
    else:
        out = contrastive.slip_loss(leaves["image"], leaves["text"], s, leaves["aug1"], leaves["aug2"],
                                    ssl_scale=SSL_SCALE, ssl_temp=temp, backend=backend)  # fmt: skip
    out["loss"].backward()
    return {k: out[k].detach() for k in PARTS}, {**{k: v.grad for k, v in leaves.items()}, "logit_scale": s.grad}


def _oracle_on_bf16_units(leaves: dict[str, torch.Tensor], s: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
    """The reference backend in fp32 on the unit vectors the triton backend gets from bf16
    embeddings: normalised in fp32, rounded to bf16. Products of bf16 values are exact in
    fp32, so only the order of the sums differs from the kernels'."""
    x, y, a, b = (F.normalize(leaves[k].float(), dim=-1).bfloat16().float() for k in ("image", "text", "aug1", "aug2"))
    clip, clip_acc = reference.clip(x, y, x, y, s, 0)
    ssl, ssl_acc = reference.simclr(a, b, a, b, temp, 0)
    return {"loss": clip + SSL_SCALE * ssl, "clip_loss": clip, "ssl_loss": ssl, "clip_acc": clip_acc, "ssl_acc": ssl_acc}


def _embeddings(b: int, d: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, d, generator=g).to(device=DEVICE, dtype=dtype) for k in ("image", "text", "aug1", "aug2")}  # each (b, d)


def _close(got: dict, want: dict, rtol: float) -> None:
    # Relative to each value's size, and to 0.1 for values near 0 (a one-sample batch's loss
    # is exactly 0; fp32 leaves a few 1e-7 of it).
    for k in want:
        scale = want[k].abs().max().clamp(min=0.1)
        torch.testing.assert_close(got[k].double() / scale, want[k].double() / scale, rtol=rtol, atol=rtol, msg=k)


@pytest.mark.parametrize(
    ("b", "d", "scale", "temp"),
    [(1, 8, 14.3, 0.1), (2, 3, 100.0, 0.05), (13, 8, 14.3, 0.1), (40, 5, 100.0, 0.07), (70, 40, 1.0, 1.0)],
)
def test_matches_reference_in_fp32(b: int, d: int, scale: float, temp: float) -> None:
    emb = _embeddings(b, d, torch.float32, seed=b + d)
    want_parts, want_grads = _run("reference", emb, scale, temp)
    parts, grads = _run("triton", emb, scale, temp)
    _close(parts, want_parts, 1e-5)
    _close(grads, want_grads, 1e-5)


def test_fp64_inputs_run_in_fp32() -> None:
    # The loss and the gradients come back in the inputs' dtype.
    emb = _embeddings(33, 16, torch.float64, seed=7)
    want_parts, want_grads = _run("reference", emb, 20.0, 0.2)
    parts, grads = _run("triton", emb, 20.0, 0.2)
    assert parts["loss"].dtype == grads["image"].dtype == torch.float64
    _close(parts, want_parts, 1e-5)
    _close(grads, want_grads, 1e-5)


@pytest.mark.parametrize(
    ("b", "d", "scale", "temp"),
    [(33, 16, 20.0, 0.2), (70, 40, 100.0, 0.07), (40, 16, 14.3, 0.1), (5, 40, 1.0, 1.0)],
)
def test_bf16_inputs_reach_the_kernels_as_bf16_unit_vectors(b: int, d: int, scale: float, temp: float, monkeypatch) -> None:
    seen = []

    def spy(p, q, s, **kwargs):
        out = tiled_lse(p, q, s, **kwargs)
        seen.append((p.dtype, q.dtype, s.dtype, *(t.dtype for t in out if t is not None)))
        return out

    tiled_lse = triton_lse.tiled_lse
    monkeypatch.setattr(triton_lse, "tiled_lse", spy)
    emb = _embeddings(b, d, torch.bfloat16, seed=b + d)
    parts, grads = _run("triton", emb, scale, temp)
    bf16, fp32 = torch.bfloat16, torch.float32
    # Two clip strips and four SimCLR strips; scale, lse, lost, max, positive fp32, argmax int64.
    assert len(seen) == 6 and set(seen) <= {(bf16, bf16, fp32, fp32, fp32, fp32, torch.int64, fp32), (bf16, bf16, fp32, fp32, fp32, fp32, torch.int64)}
    assert all(g.dtype == bf16 for k, g in grads.items() if k != "logit_scale") and grads["logit_scale"].dtype == fp32

    # Against the oracle on the same bf16 unit vectors: the loss's digits are all there, the
    # top-1 is the same; the gradients differ by bf16 roundings of theirs.
    want_parts, want_grads = _run(_oracle_on_bf16_units, emb, scale, temp)
    _close(parts, want_parts, 1e-5)
    _close(grads, want_grads, 2e-2)

    # Against the reference on the unrounded (fp32) unit vectors: within bf16's precision.
    ref_parts, ref_grads = _run("reference", emb, scale, temp)
    losses = ("loss", "clip_loss", "ssl_loss")
    _close({k: parts[k] for k in losses}, {k: ref_parts[k] for k in losses}, 1e-2)
    _close(grads, ref_grads, 3e-2)


def test_bf16_gradients_keep_their_digits_when_the_positives_dominate() -> None:
    # Trained-like views: each row's positive holds nearly all the softmax, so d loss / d logit
    # = softmax - one-hot is a small difference of two near-ones. Formed in fp32 inside the
    # kernel it is good to fp32; summed only after each part's bf16 rounding, it would be
    # wrong by more than its own size.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 16, generator=g)  # (b, d)
    near = {k: base + 0.15 * torch.randn(40, 16, generator=g) for k in ("image", "text", "aug1", "aug2")}
    emb = {k: v.to(DEVICE, torch.bfloat16) for k, v in near.items()}
    want_parts, want_grads = _run(_oracle_on_bf16_units, emb, 30.0, 0.1)
    parts, grads = _run("triton", emb, 30.0, 0.1)
    assert want_parts["clip_acc"] == 100 and want_parts["ssl_acc"] == 100 and want_parts["loss"] < 0.1
    _close(parts, want_parts, 1e-5)
    for k in ("image", "text", "aug1", "aug2"):
        err = (grads[k].double() - want_grads[k].double()).norm() / want_grads[k].double().norm()
        assert err < 3e-2, (k, err.item())


def test_ties_and_the_masked_self_like_the_reference() -> None:
    x = torch.ones(9, 4, device=DEVICE)  # every candidate equal: the top-1 is the first, the self entry masked
    s = torch.tensor([5.0], device=DEVICE)
    for backend in ("reference", "triton"):
        out = contrastive.slip_loss(x, x, s, x, x, backend=backend)
        assert out["clip_acc"].item() == pytest.approx(100 / 9) and out["ssl_acc"].item() == pytest.approx(100 / 9)
    want = contrastive.slip_loss(x, x, s, x, x, backend="reference")["ssl_loss"]
    got = contrastive.slip_loss(x, x, s, x, x, backend="triton")["ssl_loss"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("b", "world", "d", "rank"), [(24, 3, 100, 1), (40, 2, 33, 1), (7, 4, 16, 3), (50, 1, 70, 0)])
def test_a_rank_strip_against_its_logits(b: int, world: int, d: int, rank: int) -> None:
    """One rank's rows against every rank's candidates, as a multi-process step hands them to
    the kernels: the masked entry and the positive at the rank's offset, widths that leave a
    partial block of the embedding (100), against the materialised logits in fp64."""
    from kernels.reference import SELF_MASK_LOGIT

    g = torch.Generator().manual_seed(b * world + d)
    n, offset = world * b, rank * b
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(DEVICE)  # (N, d) every rank's candidates
    p = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE)  # (b, d) this rank's rows
    w_lse, w_pos = torch.randn(b, generator=g).to(DEVICE), torch.randn(b, generator=g).to(DEVICE)  # (b,) incoming gradients
    pos_offset = (offset + b) % n if world > 1 else None

    def run(fn):
        pp, qq = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
        s = torch.tensor([17.0], device=DEVICE, requires_grad=True)
        lse, positive, arg = fn(pp, qq, s)
        ((lse * w_lse).sum() + ((positive * w_pos).sum() if positive is not None else 0)).backward()
        done = (lse, positive, arg, pp.grad, qq.grad, s.grad)
        return tuple(None if t is None else t.detach() if t.dtype == torch.int64 else t.detach().double() for t in done)

    def kernels(pp, qq, s):
        lse, _, _, arg, positive = triton_lse.tiled_lse(pp, qq, s, mask_offset=offset, positive_offset=pos_offset)
        return lse, positive, arg

    def logits(pp, qq, s):
        z = s.double() * pp.double() @ qq.double().T  # (b, N)
        rows = torch.arange(b, device=DEVICE)
        z = z.index_put((rows, rows + offset), torch.tensor(SELF_MASK_LOGIT, dtype=z.dtype, device=DEVICE))
        positive = z[rows, rows + pos_offset] if pos_offset is not None else None
        return torch.logsumexp(z, dim=1), positive, z.argmax(dim=1)

    got, want = run(kernels), run(logits)
    for name, x, y in zip(("lse", "positive", "argmax", "grad_p", "grad_q", "grad_scale"), got, want):
        if y is None:
            continue
        if name == "argmax":
            assert torch.equal(x.cpu(), y.cpu()), name
            continue
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max().clamp(min=1)), msg=name)
