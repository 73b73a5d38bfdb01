"""Time and peak memory of one SLIP loss forward + backward, per backend, side by side.

Each backend runs in a fresh spawned process, so that the peak resident memory it reports
(or the CUDA allocator's peak) belongs to that backend alone. "Extra" memory is the peak
minus what the process held once the embeddings existed: the loss's own working memory.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import torch

from kernels import contrastive
from trainer.runlog import peak_bytes, reset_peak, resident_bytes

SSL_DIM = 256  # the SimCLR head's output width in SLIP


def _measure(backend: str, batch: int, dim: int, device: str, dtype: str, repeats: int, queue) -> None:
    try:
        torch.manual_seed(0)
        kind = getattr(torch, dtype)
        dev = torch.device(device)
        leaves = [torch.randn(batch, d, device=dev, dtype=kind, requires_grad=True) for d in (dim, dim, SSL_DIM, SSL_DIM)]
        scale = torch.tensor([1 / 0.07], device=dev, requires_grad=True)
        times = []
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        reset_peak(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else resident_bytes()
        for _ in range(repeats):
            start = time.perf_counter()
            out = contrastive.slip_loss(leaves[0], leaves[1], scale, leaves[2], leaves[3], backend=backend)
            out["loss"].backward()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
        peak = peak_bytes(dev)
        queue.put({"seconds": min(times), "extra_peak_bytes": max(0, peak - before), "loss": float(out["loss"].detach())})
    except Exception as err:  # reported by the parent as this backend's failure
        queue.put({"error": f"{type(err).__name__}: {err}"})


def profile_loss(
    batch: int, dim: int, backends: list[str], *, device: str = "cpu", dtype: str = "float32", repeats: int = 1
) -> dict[str, Any]:
    for name in backends:
        if name not in contrastive.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; available: {', '.join(contrastive.BACKENDS)}")
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {}
    for name in backends:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(name, batch, dim, device, dtype, repeats, queue))
        proc.start()
        proc.join()
        results[name] = queue.get() if not queue.empty() else {"error": f"exited with code {proc.exitcode}"}
    first = results[backends[0]]
    for name in backends[1:]:
        r = results[name]
        if "error" not in r and "error" not in first:
            r["time_ratio"] = r["seconds"] / first["seconds"]
            r["memory_ratio"] = r["extra_peak_bytes"] / max(first["extra_peak_bytes"], 1)
    return {"batch": batch, "dim": dim, "ssl_dim": SSL_DIM, "device": device, "dtype": dtype, "backends": results}
