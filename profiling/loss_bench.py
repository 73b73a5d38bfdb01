"""Time and peak memory of one SLIP loss forward + backward, per backend, side by side.

Each backend runs in a fresh spawned process, so that the peak resident memory it reports
(or the CUDA allocator's peak) belongs to that backend alone. "Extra" memory is the peak
minus what the process held once the embeddings existed: the loss's own working memory.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
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


def bisect_fitting(fits: Callable[[int], bool], lo: int, hi: int, step: int = 1024) -> int:
    """The largest multiple of `step` in [lo, hi) that fits, given that `lo` does (0: nothing) and `hi` does not."""
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_fitting(fits: Callable[[int], bool], start: int, step: int = 1024, cap: int = 2**24) -> int:
    """The largest multiple of `step` (up to `cap`) for which `fits`, assuming that whatever fits,
    every smaller batch fits too: doubling from `start` until one does not fit, then bisection
    between the last that did and the first that did not. 0 when not even `step` fits."""
    first = max(step, start // step * step)
    if not fits(first):
        return bisect_fitting(fits, 0, first, step)
    lo, hi = first, 2 * first
    while hi <= cap and fits(hi):
        lo, hi = hi, 2 * hi
    return lo if hi > cap else bisect_fitting(fits, lo, hi, step)


def linear_guess(small: tuple[int, int], large: tuple[int, int], budget: int, step: int = 1024) -> int:
    """Where the line through two (batch, peak bytes) probes meets `budget`, rounded down to `step`:
    the tiled backends' memory grows linearly with the batch (the reference's does not; a
    check of the guess catches that)."""
    (b1, p1), (b2, p2) = small, large
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return b2
    return max(b2, int((budget - (p2 - slope * b2)) / slope) // step * step)


def _fit(backend: str, dim: int, device: str, dtype: str, budget: int, start: int, queue) -> None:
    """The largest batch (a multiple of 1024) whose forward + backward keeps the CUDA allocator's
    peak, embeddings and gradients included, within `budget` bytes; the process may not allocate
    beyond it at all. Probes at `start` and twice it give a line (`linear_guess`), the guess is
    checked, and a guess that does not fit is bisected down: three probes where memory is linear,
    each a full forward + backward, which at a million rows is seconds even when fast."""
    try:
        dev = torch.device(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(dev).total_memory), dev)
        kind = getattr(torch, dtype)
        probes: list[tuple[int, bool, int]] = []

        def fits(b: int) -> bool:
            torch.cuda.empty_cache()
            reset_peak(dev)
            try:
                leaves = [torch.randn(b, d, device=dev, dtype=kind, requires_grad=True) for d in (dim, dim, SSL_DIM, SSL_DIM)]
                scale = torch.tensor([1 / 0.07], device=dev, requires_grad=True)
                contrastive.slip_loss(leaves[0], leaves[1], scale, leaves[2], leaves[3], backend=backend)["loss"].backward()
                torch.cuda.synchronize(dev)
                ok = peak_bytes(dev) <= budget
            except torch.OutOfMemoryError:
                ok = False
            probes.append((b, ok, peak_bytes(dev)))
            return ok

        first = max(1024, start // 1024 * 1024)
        if fits(first) and fits(2 * first) and probes[1][2] > probes[0][2]:
            guess = linear_guess(probes[0][::2], probes[1][::2], budget)
            lo = guess if guess == 2 * first or fits(guess) else bisect_fitting(fits, 2 * first, guess)
        else:
            lo = largest_fitting(fits, first)
        queue.put({"largest_batch": lo, "budget_bytes": budget, "probes": probes})
    except Exception as err:  # reported by the parent as this backend's failure
        queue.put({"error": f"{type(err).__name__}: {err}"})


def fit_batches(dim: int, backends: list[str], *, device: str, dtype: str, budget_gib: float, start: int) -> dict[str, Any]:
    """Per backend, in a fresh process each, the largest batch that fits in `budget_gib` GiB of GPU memory."""
    if torch.device(device).type != "cuda":
        raise ValueError("--fit measures the CUDA allocator: it needs --device cuda")
    results = {}
    for name in _checked(backends):
        results[name] = _spawned(_fit, name, dim, device, dtype, int(budget_gib * 2**30), start)
    return {"dim": dim, "ssl_dim": SSL_DIM, "device": device, "dtype": dtype, "budget_gib": budget_gib, "backends": results}


def _checked(backends: list[str]) -> list[str]:
    for name in backends:
        if name not in contrastive.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; available: {', '.join(contrastive.BACKENDS)}")
    return backends


def _spawned(target, *args: Any) -> dict[str, Any]:
    """target(*args, queue) in a fresh spawned process: its memory figures are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join()
    return queue.get() if not queue.empty() else {"error": f"exited with code {proc.exitcode}"}


def profile_loss(
    batch: int, dim: int, backends: list[str], *, device: str = "cpu", dtype: str = "float32", repeats: int = 1
) -> dict[str, Any]:
    results = {name: _spawned(_measure, name, batch, dim, device, dtype, repeats) for name in _checked(backends)}
    first = results[backends[0]]
    for name in backends[1:]:
        r = results[name]
        if "error" not in r and "error" not in first:
            r["time_ratio"] = r["seconds"] / first["seconds"]
            r["memory_ratio"] = r["extra_peak_bytes"] / max(first["extra_peak_bytes"], 1)
    return {"batch": batch, "dim": dim, "ssl_dim": SSL_DIM, "device": device, "dtype": dtype, "backends": results}
