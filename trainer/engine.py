"""The one place DeepSpeed is touched: the process group, the engine around a built model, and
the few things DeepSpeed does to a process that the rest of the trainer must undo or work with.

The recipe's `engine`, `optim` and `data` sections are translated into DeepSpeed's config
here, so there is no hand-written JSON to keep in sync with the YAML. DeepSpeed is imported
inside the functions that need it: importing it takes seconds and prints, and a command that
only converts or evaluates never needs it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from kernels.cross_rank_bn import CrossRankBatchNorm1d
from trainer.dist import DistInfo
from trainer.launch import local_batch


def init_distributed(device: str) -> DistInfo:
    """Join the launcher's process group, or make a one-process group when run directly."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # `slip train` without a launcher: a world of one on a free local port.
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import torch.distributed as tdist

    if not tdist.is_initialized():
        # Only the CPU backend maps the buffers; NCCL's set-up keeps what the launcher said.
        with _without_env("LOCAL_SIZE") if device == "cpu" else contextlib.nullcontext():
            deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _share_cores(device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local_rank, torch_device)


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    """`name` unset for the block (DeepSpeed's C++ reads the environment itself), then restored.

    With LOCAL_SIZE equal to the world size (what its launcher sets on one node), DeepSpeed's
    CPU backend maps a 66 MB `deepspeed_allreduce_buffer_*` file per rank in /dev/shm and never
    unlinks it: RAM lost to every multi-rank CPU run, however it ended. The buffers serve only
    `inference_all_reduce`, which training never calls; its gradients go through gloo either way."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


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
    return CrossRankBatchNorm1d.convert(model, dist.group)


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
    local = local_batch(global_batch, world, micro_batches)
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
    """DeepSpeed's engine around the model; its checkpoints load with weights_only=True."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.checkpoint_engine = _weights_only_checkpoint_engine()()
    return engine


def optimizer_master(param: nn.Parameter) -> torch.Tensor | None:
    """The values of `param` that the optimizer updates on this rank, as a view to change in place
    (None where this rank holds none of them).

    Under ZeRO the torch optimizer steps an fp32 master, not the module's parameter, and
    DeepSpeed copies the master back into the module after that step: ZeRO 1-2 a flat partition
    cloned from the parameters (`param`'s fragment is on the rank whose partition holds it),
    ZeRO-3 each rank's partition. Without ZeRO the parameter is its own master."""
    if hasattr(param, "ds_id"):  # ZeRO-3 (without optimizer offload, which the config never sets, a view)
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param)
        return local if local is not None and local.numel() else None
    if hasattr(param, "_hp_mapping"):  # ZeRO 1-2
        return None if param._hp_mapping is None else param._hp_mapping.get_hp_fragment()
    return param.data


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def fused_lamb(param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """DeepSpeed's fused CUDA LAMB (its op JIT-builds on first use)."""
    from deepspeed.ops.lamb import FusedLamb

    return FusedLamb(param_groups, lr=lr, betas=betas, eps=eps)


def _deepspeed_records() -> list[type]:
    """The plain-data classes DeepSpeed's ZeRO states pickle (found by loading stages 0-3);
    allowing these three is far narrower than weights_only=False, which runs any code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@functools.cache
def _weights_only_checkpoint_engine() -> type:
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (DeepSpeed's own loads
    with weights_only=False, so a checkpoint could run code)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(_deepspeed_records()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine


@contextlib.contextmanager
def gathered_module(engine: Any) -> Iterator[nn.Module]:
    """The engine's module with whole parameters for the block. Under ZeRO-3 its parameters are
    partitions and this gathers them: collective, every rank must enter."""
    module = engine.module
    if engine.zero_optimization_stage() != 3:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield module


@contextlib.contextmanager
def linear_restored() -> Iterator[None]:
    """ZeRO-3 swaps torch.nn.functional.linear for its own (memory-saving, numerically not bitwise
    the same) for the rest of the process; it is put back when the block ends, so a later run in
    this process (tests, sweeps, `slip profile step --same-process`) computes as a fresh process does."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def heads_callable(model: Any) -> tuple[Any, contextlib.AbstractContextManager[Any]]:
    """What to call for a plain-autograd forward through `model` (an engine or a bare module), and
    the context to call it in.

    DeepSpeed's engine registers backward hooks on the outputs of every engine(...) call: they
    start its backward bookkeeping (and refuse to run outside engine.backward at ZeRO stage 0)
    and divide gradients by the accumulation steps. GradCache's torch.autograd.grad must not
    trigger them, so it calls the engine's module (still the model's forward, so ZeRO-3's module
    hooks gather its parameters) in the engine's autocast context (the precision of engine(...))."""
    if "deepspeed" in sys.modules:  # an engine can only exist once deepspeed is imported
        from deepspeed import DeepSpeedEngine
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        if isinstance(model, DeepSpeedEngine):
            return model.module, autocast_if_enabled(model)
    return model, contextlib.nullcontext()


# DeepSpeed's reductions of gradients (ZeRO 0 all-reduces, ZeRO 1-2 reduce-scatters or reduces),
# called as `deepspeed.comm.<name>` by the engine and the ZeRO optimizers; the loss's own
# collectives call torch.distributed directly and are not among them.
_REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_fn", "reduce_scatter_tensor", "inference_all_reduce")
# The ZeRO optimizers' end of backward: the last buckets reduced, then a wait for the reduction stream.
_EPILOGUES = ("independent_gradient_partition_epilogue", "reduce_gradients")


@contextlib.contextmanager
def reductions_wrapped(engine: Any, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """DeepSpeed's gradient reductions and the optimizer's reduction epilogues replaced by
    `wrap(original)` for the block (the profiler's marks); restored on exit."""
    import deepspeed.comm as ds_comm

    saved = {name: getattr(ds_comm, name) for name in _REDUCTIONS if hasattr(ds_comm, name)}
    optimizer = engine.optimizer
    epilogues = [name for name in _EPILOGUES if callable(getattr(type(optimizer), name, None))]
    for name, fn in saved.items():
        setattr(ds_comm, name, wrap(fn))
    for name in epilogues:  # instance attributes shadow the class's methods; deleting them restores them
        setattr(optimizer, name, wrap(getattr(type(optimizer), name).__get__(optimizer)))
    try:
        yield
    finally:
        for name in epilogues:
            delattr(optimizer, name)
        for name, fn in saved.items():
            setattr(ds_comm, name, fn)


def prebuild_cpu_comm_op() -> None:
    """DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; build it ahead, once."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)


if __name__ == "__main__" and sys.argv[1:] == ["--prebuild"]:
    prebuild_cpu_comm_op()
