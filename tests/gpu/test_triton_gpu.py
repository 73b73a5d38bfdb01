"""The `triton` backend compiled for the GPU against the `reference` oracle on CUDA.

The kernels must really be compiled here (not interpreted: a GPU machine's environment could
still carry TRITON_INTERPRET), at the widths of the model (512, 256) and at one that leaves a
partial block of the embedding (100); the top-1 accuracies (the kernels' argmax) are compared
too. One rank's strip against every rank's candidates runs in tests/unit/kernels, on the GPU
when there is one.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import contrastive, reference, triton_lse

pytestmark = pytest.mark.gpu


def _oracle_on_bf16_units(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict:
    """reference in fp32 on the unit vectors the triton backend gets from bf16 embeddings:
    normalised in fp32, rounded to bf16 (the kernels' bf16 x bf16 products are exact in fp32)."""
    x, y, a, b = (F.normalize(e.float(), dim=-1).bfloat16().float() for e in (x, y, a, b))
    clip, clip_acc = reference.clip(x, y, x, y, s, 0)
    ssl, ssl_acc = reference.simclr(a, b, a, b, 0.1, 0)
    return {"loss": clip + ssl, "clip_loss": clip, "ssl_loss": ssl, "clip_acc": clip_acc, "ssl_acc": ssl_acc}


def test_the_kernels_are_compiled_here() -> None:
    assert not triton_lse.INTERPRETED, "TRITON_INTERPRET is set on a CUDA machine: the GPU tests would check the interpreter"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "widths"), [(100, (512, 256)), (1000, (512, 256)), (300, (100, 100))])
def test_compiled_kernels_match_the_reference(b: int, widths: tuple[int, int], dtype: torch.dtype) -> None:
    # fp32 runs the kernels in fp32 (TF32x3 products); bf16 runs their bf16 tensor-core path,
    # so its oracle is the reference on the same bf16 unit vectors.
    g = torch.Generator(device="cuda").manual_seed(b)
    clip_d, ssl_d = widths
    emb = {k: torch.randn(b, d, device="cuda", generator=g).to(dtype) for k, d in (("x", clip_d), ("y", clip_d), ("a", ssl_d), ("b", ssl_d))}
    results = {}
    for backend in ("reference", "triton", "oracle"):
        if backend == "oracle" and dtype != torch.bfloat16:
            continue
        leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
        s = torch.tensor([14.3], device="cuda", requires_grad=True)
        if backend == "oracle":
            out = _oracle_on_bf16_units(leaves["x"], leaves["y"], s, leaves["a"], leaves["b"])
        else:
            out = contrastive.slip_loss(leaves["x"], leaves["y"], s, leaves["a"], leaves["b"], backend=backend)
        out["loss"].backward()
        results[backend] = (out, {k: v.grad.float() for k, v in leaves.items()}, s.grad)
    (want, want_g, want_s), (got, got_g, got_s) = results.get("oracle", results["reference"]), results["triton"]
    for k in ("clip_loss", "ssl_loss"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    for k in ("clip_acc", "ssl_acc"):  # the argmax: equal but for a tie broken by rounding
        assert abs(float(got[k]) - float(want[k])) <= 100 / b, (k, got[k], want[k])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k in want_g:
        scale = want_g[k].abs().max()
        torch.testing.assert_close(got_g[k] / scale, want_g[k] / scale, rtol=tol, atol=tol)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-6)
    if dtype == torch.bfloat16:  # and the reference on the unrounded unit vectors, to bf16's precision
        ref = results["reference"][0]
        for k in ("clip_loss", "ssl_loss"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-2, atol=1e-3)
