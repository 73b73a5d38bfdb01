"""The `triton` backend's fused kernels against the `reference` oracle.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1),
the same code the GPU compiles. Batches and widths are chosen across the kernels' block
sizes (32): one partial block, several blocks with a partial last one, widths below and
above one block of the embedding dimension.
"""
import pytest
import torch

from kernels import contrastive

PARTS = ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc")


def _run(backend: str, emb: dict[str, torch.Tensor], scale: float, temp: float) -> tuple[dict, dict]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
    s = torch.tensor([scale], dtype=emb["image"].dtype if emb["image"].dtype != torch.bfloat16 else torch.float32)
    s.requires_grad_(True)
    out = contrastive.slip_loss(leaves["image"], leaves["text"], s, leaves["aug1"], leaves["aug2"],
                                ssl_scale=0.7, ssl_temp=temp, backend=backend)  # fmt: skip
    out["loss"].backward()
    return {k: out[k].detach() for k in PARTS}, {**{k: v.grad for k, v in leaves.items()}, "logit_scale": s.grad}


def _embeddings(b: int, d: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, d, generator=g).to(dtype) for k in ("image", "text", "aug1", "aug2")}  # each (b, d)


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


@pytest.mark.parametrize(("dtype", "grad_rtol"), [(torch.float64, 1e-5), (torch.bfloat16, 2e-2)])
def test_fp64_and_bf16_inputs(dtype: torch.dtype, grad_rtol: float) -> None:
    # Both are computed in fp32; the gradients come back in the inputs' dtype (bf16: 8 bits).
    emb = _embeddings(33, 16, dtype, seed=7)
    want_parts, want_grads = _run("reference", emb, 20.0, 0.2)
    parts, grads = _run("triton", emb, 20.0, 0.2)
    assert grads["image"].dtype == dtype
    _close(parts, want_parts, 1e-5)
    _close(grads, want_grads, grad_rtol)


def test_ties_and_the_masked_self_like_the_reference() -> None:
    x = torch.ones(9, 4)  # every candidate equal: the top-1 is the first, the self entry masked
    for backend in ("reference", "triton"):
        out = contrastive.slip_loss(x, x, torch.tensor([5.0]), x, x, backend=backend)
        assert out["clip_acc"].item() == pytest.approx(100 / 9) and out["ssl_acc"].item() == pytest.approx(100 / 9)
    want = contrastive.slip_loss(x, x, torch.tensor([5.0]), x, x, backend="reference")["ssl_loss"]
    got = contrastive.slip_loss(x, x, torch.tensor([5.0]), x, x, backend="triton")["ssl_loss"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
