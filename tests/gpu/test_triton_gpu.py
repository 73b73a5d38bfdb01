"""The `triton` backend compiled for the GPU against the `reference` oracle on CUDA."""
import pytest
import torch
import torch.nn.functional as F

from kernels import contrastive, reference

pytestmark = pytest.mark.gpu


def _oracle_on_bf16_units(x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict:
    """reference in fp32 on the unit vectors the triton backend gets from bf16 embeddings:
    normalised in fp32, rounded to bf16 (the kernels' bf16 x bf16 products are exact in fp32)."""
    x, y, a, b = (F.normalize(e.float(), dim=-1).bfloat16().float() for e in (x, y, a, b))
    clip, _ = reference.clip(x, y, x, y, s, 0)
    ssl, _ = reference.simclr(a, b, a, b, 0.1, 0)
    return {"loss": clip + ssl, "clip_loss": clip, "ssl_loss": ssl}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [100, 1000])
def test_compiled_kernels_match_the_reference(b: int, dtype: torch.dtype) -> None:
    # fp32 runs the kernels in fp32 (TF32x3 products); bf16 runs their bf16 tensor-core path,
    # so its oracle is the reference on the same bf16 unit vectors.
    g = torch.Generator(device="cuda").manual_seed(b)
    emb = {k: torch.randn(b, d, device="cuda", generator=g).to(dtype) for k, d in (("x", 512), ("y", 512), ("a", 256), ("b", 256))}
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
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k in want_g:
        scale = want_g[k].abs().max()
        torch.testing.assert_close(got_g[k] / scale, want_g[k] / scale, rtol=tol, atol=tol)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-6)
    if dtype == torch.bfloat16:  # and the reference on the unrounded unit vectors, to bf16's precision
        ref = results["reference"][0]
        for k in ("clip_loss", "ssl_loss"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-2, atol=1e-3)
