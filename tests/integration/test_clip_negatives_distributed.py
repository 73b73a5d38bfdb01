"""loss.clip_negatives=detached: CLIP's gathered candidates are constants, as the reference's are.

W gloo processes each hold a slice of one random float64 batch. The oracle, written here from
the behaviour: each rank normalises its embeddings, gathers every rank's without gradient,
and takes (CE(s * x @ Y.T) + CE(s * y @ X.T)) / 2 over its own rows against labels
rank * b + arange(b); gradients are that rank's own (the engine then averages them over ranks
alike). slipstream's clip_loss and slip_loss with clip_negatives=detached must give the same
loss and the same gradients on every rank, with every backend; SimCLR's part stays exact.
"""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import spawn_ranks

from kernels import chunked, contrastive

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

B_LOCAL, D, D_SSL = 3, 8, 6
JOIN_TIMEOUT_S = 240.0


def _oracle(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, dict]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in (("image", image), ("text", text), ("logit_scale", scale))}
    x, y = F.normalize(leaves["image"], dim=-1), F.normalize(leaves["text"], dim=-1)  # (b, d) each
    xs, ys = [torch.empty_like(x) for _ in range(world)], [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(xs, x.detach())
    dist.all_gather(ys, y.detach())
    x_all, y_all = torch.cat(xs), torch.cat(ys)  # (W*b, d) each, constants
    labels = rank * x.shape[0] + torch.arange(x.shape[0])
    s = leaves["logit_scale"]
    loss = (F.cross_entropy(s * x @ y_all.T, labels) + F.cross_entropy(s * y @ x_all.T, labels)) / 2
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def _slipstream(local: dict, backend: str, slip: bool) -> tuple[torch.Tensor, dict]:
    tiles = chunked.ROWS, chunked.COLS
    chunked.ROWS, chunked.COLS = 2, 5  # several tiles even on these small batches
    try:
        leaves = {k: v.clone().requires_grad_(True) for k, v in local.items()}
        if slip:
            out = contrastive.slip_loss(
                leaves["image"], leaves["text"], leaves["logit_scale"], leaves["aug1"], leaves["aug2"],
                ssl_temp=0.2, backend=backend, group=dist.group.WORLD, clip_negatives="detached",
            )  # fmt: skip
        else:
            out = contrastive.clip_loss(
                leaves["image"], leaves["text"], leaves["logit_scale"], backend=backend, group=dist.group.WORLD, clip_negatives="detached"
            )
        out["loss"].backward()
    finally:
        chunked.ROWS, chunked.COLS = tiles
    return out["clip_loss"].detach(), {k: v.grad for k, v in leaves.items()}


def _ssl_grads(local: dict, backend: str) -> dict:
    """The exact SimCLR loss's gradients on the views: what slip_loss's views must get either way."""
    leaves = {k: local[k].clone().requires_grad_(True) for k in ("aug1", "aug2")}
    contrastive.simclr_loss(leaves["aug1"], leaves["aug2"], 0.2, backend=backend, group=dist.group.WORLD)["loss"].backward()
    return {k: v.grad for k, v in leaves.items()}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)  # W processes share two cores
    tmp_dir = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir / f'init_{world}'}", rank=rank, world_size=world)
    try:
        full = torch.load(tmp_dir / "batch.pt")
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        local = {k: (v if k == "logit_scale" else v[rows]) for k, v in full.items()}
        results = {"oracle": _oracle(local["image"], local["text"], local["logit_scale"], rank, world)}
        for backend in contrastive.BACKENDS:
            clip_only = {k: local[k] for k in ("image", "text", "logit_scale")}
            results[backend] = {"clip": _slipstream(clip_only, backend, slip=False), "slip": _slipstream(local, backend, slip=True)}
            results[backend]["ssl"] = _ssl_grads(local, backend)
        torch.save(results, tmp_dir / f"rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: Path) -> None:
    spawn_ranks(_worker, world, (world, str(tmp)), timeout_s=JOIN_TIMEOUT_S, what=f"the run with {world} processes")


@pytest.mark.parametrize("world", [2, 4])
def test_detached_negatives_match_the_reference_gradient(world: int, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2000 + world)
    n = world * B_LOCAL
    batch = {
        "image": torch.randn(n, D, generator=g, dtype=torch.float64),  # (W*b, d)
        "text": torch.randn(n, D, generator=g, dtype=torch.float64),  # (W*b, d)
        "aug1": torch.randn(n, D_SSL, generator=g, dtype=torch.float64),  # (W*b, d_ssl)
        "aug2": torch.randn(n, D_SSL, generator=g, dtype=torch.float64),  # (W*b, d_ssl)
        "logit_scale": torch.tensor([3.0 + torch.rand(1, generator=g).item()], dtype=torch.float64),  # (1,)
    }
    torch.save(batch, tmp_path / "batch.pt")
    _spawn(world, tmp_path)
    for rank in range(world):
        res = torch.load(tmp_path / f"rank_{rank}.pt")
        want_loss, want = res["oracle"]
        for backend in contrastive.BACKENDS:
            # triton computes in fp32 whatever the input dtype; the others in fp64.
            tol = dict(rtol=1e-5, atol=1e-6) if backend == "triton" else dict(rtol=1e-10, atol=1e-12)
            for kind in ("clip", "slip"):
                loss, grads = res[backend][kind]
                msg = f"{backend} {kind} rank {rank}"
                torch.testing.assert_close(loss, want_loss, **tol, msg=msg)
                for k in ("image", "text", "logit_scale"):
                    torch.testing.assert_close(grads[k], want[k], **tol, msg=f"{msg} {k}")
            for k in ("aug1", "aug2"):  # SimCLR's candidates keep their gradient
                torch.testing.assert_close(res[backend]["slip"][1][k], res[backend]["ssl"][k], **tol, msg=f"{backend} ssl {k}")
