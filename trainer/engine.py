"""The one place DeepSpeed is touched: process group set-up and the engine around a built model.

The recipe's `engine`, `optim` and `data` sections are translated into DeepSpeed's config
here, so there is no hand-written JSON to keep in sync with the YAML.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> Any:
        """The process group the loss gathers over; None in a single process."""
        import torch.distributed as dist

        return dist.group.WORLD if self.world > 1 else None


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("config: engine.device is cuda but no CUDA device is visible")
    return requested


def init_distributed(device: str) -> DistInfo:
    """Join the launcher's process group, or make a one-process group when run directly."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # `slip train` without a launcher: a world of one on a free local port.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _share_cores(device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device)


def _share_cores(device: str) -> None:
    """CPU ranks on one machine split its cores. Each would otherwise run torch's thread pool
    over all of them, and the pools' spin-waits fight: on 2 cores and 2 ranks, optimizer steps of
    1.4 s instead of 0.08 s every few steps (`slip profile step`). An OMP_NUM_THREADS the user or
    the launcher set (deepspeed --bind_cores_to_rank) is left alone."""
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")  # deepspeed's, torchrun's
    if device != "cpu" or local <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallelize(model: nn.Module, dist: DistInfo) -> nn.Module:
    """Make a built model's batch statistics span all ranks, as SLIP's SimCLR head needs."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if dist.world == 1 or not has_bn:
        return model
    if dist.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch's SyncBatchNorm refuses CPU tensors; per-rank statistics would silently change the loss.
    from kernels.cross_rank_bn import CrossRankBatchNorm1d

    return CrossRankBatchNorm1d.convert(model, dist.group)


def reduce_mean(values: dict[str, torch.Tensor], dist: DistInfo) -> dict[str, float]:
    """Scalar metrics averaged over ranks (each rank's loss covers its own rows)."""
    stacked = torch.stack([v.reshape(()) for v in values.values()])  # (n_metrics,)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(stacked)
        stacked /= dist.world
    return dict(zip(values, stacked.tolist()))


def deepspeed_config(
    global_batch: int,
    world: int,
    *,
    zero_stage: int,
    precision: str,
    grad_clip: float,
    micro_batches: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """The recipe's engine section as DeepSpeed's config. `micro_batches` > 1 is GradCache
    accumulation: DeepSpeed accumulates that many backward passes per optimizer step."""
    if global_batch % world:
        raise ValueError(f"config: data.batch_size {global_batch} is not divisible by {world} ranks")
    local = global_batch // world
    if local % micro_batches:
        raise ValueError(f"config: the local batch {local} is not divisible by engine.micro_batches {micro_batches}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        # Overlapping the gradient reduction with backward needs a CUDA stream.
        zero.update(overlap_comm=device == "cuda", contiguous_gradients=True)
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": local // micro_batches,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # bf16 as SLIP ran fp16: autocast over fp32 weights, so BatchNorm statistics, the
        # logit scale and the optimizer's update stay fp32 while the matmuls run in bf16.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": sys.maxsize,  # slipstream logs its own metrics
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def prebuild_cpu_comm_op() -> None:
    """DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; build it ahead, once."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)


if __name__ == "__main__" and sys.argv[1:] == ["--prebuild"]:
    prebuild_cpu_comm_op()
