"""Peak memory of this process for the benchmarks: the CUDA allocator's on a GPU, the resident
set's high-water mark on the CPU. Both can be reset, so a peak belongs to what ran after the reset
and not to an import that briefly held hundreds of MB (getrusage's ru_maxrss never goes down)."""
from __future__ import annotations

import resource

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM to the current resident set
    except OSError:
        pass  # no procfs: the peak is then the process's so far


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes(device: torch.device) -> int:
    """The peak since the last reset_peak (or since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
