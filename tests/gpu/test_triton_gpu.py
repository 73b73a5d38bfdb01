"""The `triton` backend compiled for the GPU against the `reference` oracle on CUDA."""
import pytest
import torch

from kernels import contrastive

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [100, 1000])
def test_compiled_kernels_match_the_reference(b: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(b)
    emb = {k: torch.randn(b, d, device="cuda", generator=g).to(dtype) for k, d in (("x", 512), ("y", 512), ("a", 256), ("b", 256))}
    results = {}
    for backend in ("reference", "triton"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
        s = torch.tensor([14.3], device="cuda", requires_grad=True)
        out = contrastive.slip_loss(leaves["x"], leaves["y"], s, leaves["a"], leaves["b"], backend=backend)
        out["loss"].backward()
        results[backend] = (out, {k: v.grad.float() for k, v in leaves.items()}, s.grad)
    (want, want_g, want_s), (got, got_g, got_s) = results["reference"], results["triton"]
    for k in ("clip_loss", "ssl_loss"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k in want_g:
        scale = want_g[k].abs().max()
        torch.testing.assert_close(got_g[k] / scale, want_g[k] / scale, rtol=tol, atol=tol)
    torch.testing.assert_close(got_s, want_s, rtol=1e-4, atol=1e-6)
