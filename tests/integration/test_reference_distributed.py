"""The distributed losses equal the single-process global-batch loss of the reference.

W gloo processes each hold a disjoint slice of one random float64 batch, compute
slip_loss with the WORLD group and backward, with every backend (the `chunked` one on
tiles smaller than the batch); the parent compares with the reference slip_loss on the
whole batch in one process. What must hold, given that the engine averages gradients
over ranks afterwards:
  - mean over ranks of each loss part == the global part;
  - each rank's embedding gradient / W == its slice of the global gradient (every rank
    receives the sum over all ranks' losses through the reduce-scatter);
  - mean over ranks of the logit_scale gradient == the global one.
Children write results with torch.save; the parent asserts.
"""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks

from kernels import chunked, collectives, contrastive

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

B_LOCAL, D, D_SSL = 3, 8, 6
KW = dict(ssl_scale=0.5, ssl_temp=0.2)
NAMES = ("image", "text", "aug1", "aug2")
PARTS = ("loss", "clip_loss", "ssl_loss", "clip_acc", "ssl_acc")
JOIN_TIMEOUT_S = 120.0


def _slip(batch: dict[str, torch.Tensor], group, backend: str = "reference") -> tuple[dict, dict]:
    """Loss parts and gradients of slip_loss on `batch` (fresh leaves)."""
    tiles = chunked.ROWS, chunked.COLS
    chunked.ROWS, chunked.COLS = 2, 5  # several tiles even on these small batches
    try:
        leaves = {k: v.clone().requires_grad_(True) for k, v in batch.items()}
        out = contrastive.slip_loss(
            leaves["image"], leaves["text"], leaves["logit_scale"], leaves["aug1"], leaves["aug2"],
            group=group, backend=backend, **KW,
        )
        out["loss"].backward()
    finally:
        chunked.ROWS, chunked.COLS = tiles  # the parent process runs other tests after this one
    return {k: out[k].detach() for k in PARTS}, {k: v.grad for k, v in leaves.items()}


def _no_reduce_scatter(*args, **kwargs):
    raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")


def _worker(rank: int, world: int, tmp: str, mode: str) -> None:
    torch.set_num_threads(1)  # W processes share two cores
    tmp_dir = Path(tmp)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_dir / f'init_{mode}_{world}'}", rank=rank, world_size=world
    )
    try:
        if mode == "uneven":
            b = 3 if rank == 0 else 2
            e = torch.randn(b, D, dtype=torch.float64)
            try:
                contrastive.slip_loss(e, e, torch.ones(1, dtype=torch.float64), e, e, group=dist.group.WORLD)
                result = "no error"
            except ValueError as err:
                result = str(err)
            torch.save(result, tmp_dir / f"uneven_{rank}.pt")
            return
        full = torch.load(tmp_dir / "batch.pt")
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        local = {k: (v if k == "logit_scale" else v[rows]) for k, v in full.items()}
        results = {}
        for backend in contrastive.BACKENDS:
            results[backend] = dict(zip(("parts", "grads"), _slip(local, dist.group.WORLD, backend)))
        # Same step through the all_reduce + slice path for backends without reduce-scatter.
        collectives._reduce_scatter = _no_reduce_scatter
        for backend in contrastive.BACKENDS:
            results[backend]["fallback"] = _slip(local, dist.group.WORLD, backend)[1]
        torch.save(results, tmp_dir / f"rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: Path, mode: str) -> None:
    """Run _worker on `world` processes; fail (and kill them) rather than hang."""
    spawn_ranks(_worker, world, (world, str(tmp), mode), timeout_s=JOIN_TIMEOUT_S, what=f"{mode} run with {world} processes")


@pytest.mark.parametrize("world", [2, 4])
def test_slip_matches_global_batch(world: int, tmp_path: Path):
    g = torch.Generator().manual_seed(1000 + world)
    n = world * B_LOCAL
    batch = {
        "image": torch.randn(n, D, generator=g, dtype=torch.float64),  # (W*b, d)
        "text": torch.randn(n, D, generator=g, dtype=torch.float64),  # (W*b, d)
        "aug1": torch.randn(n, D_SSL, generator=g, dtype=torch.float64),  # (W*b, d_ssl)
        "aug2": torch.randn(n, D_SSL, generator=g, dtype=torch.float64),  # (W*b, d_ssl)
        "logit_scale": torch.tensor([4.0], dtype=torch.float64),  # (1,)
    }
    torch.save(batch, tmp_path / "batch.pt")
    _spawn(world, tmp_path, "exact")
    want_parts, want_grads = _slip(batch, group=None)
    results = [torch.load(tmp_path / f"rank_{r}.pt") for r in range(world)]

    for backend in contrastive.BACKENDS:
        ranks = [res[backend] for res in results]
        # triton computes in fp32 whatever the input dtype; the others in fp64.
        parts_tol, grad_tol = (dict(rtol=1e-5, atol=1e-6),) * 2 if backend == "triton" else (dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-10, atol=1e-12))
        for k in PARTS:
            mean = torch.stack([r["parts"][k] for r in ranks]).mean()
            torch.testing.assert_close(mean, want_parts[k], **parts_tol, msg=f"{backend} {k}")
        for key in ("grads", "fallback"):
            for r, res in enumerate(ranks):
                rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
                for k in NAMES:
                    torch.testing.assert_close(
                        res[key][k] / world, want_grads[k][rows], **grad_tol, msg=f"{backend} {key} {k} rank {r}"
                    )
            scale_grad = torch.stack([res[key]["logit_scale"] for res in ranks]).mean(0)
            torch.testing.assert_close(scale_grad, want_grads["logit_scale"], **grad_tol, msg=f"{backend} {key}")


def test_uneven_batch_raises_on_every_rank(tmp_path: Path):
    _spawn(2, tmp_path, "uneven")
    for r in range(2):
        msg = torch.load(tmp_path / f"uneven_{r}.pt")
        assert "same local batch" in msg and "rank 0: 3x" in msg and "rank 1: 2x" in msg, msg
