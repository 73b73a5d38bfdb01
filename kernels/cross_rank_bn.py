"""BatchNorm whose batch statistics span every rank, for any process-group backend.

SLIP's SimCLR head normalises over the global batch. On CUDA torch's SyncBatchNorm does
that; it refuses CPU tensors, so CPU (gloo) runs use this module: the same statistics from
differentiable all-reduces (`torch.distributed.nn`), whose backward sums the statistics'
gradients over ranks, so each rank's input gradient is that of the global-batch loss (the
same convention as the contrastive all-gather). The variance is two-pass (mean first, then
the mean squared deviation), which stays exact where E[x^2] - E[x]^2 would cancel.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d over the union of every rank's batch; `group` None is plain BatchNorm1d."""

    def __init__(self, num_features: int, *, group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group = group

    @classmethod
    def convert(cls, module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
        """A copy-free swap of every BatchNorm1d in `module` (parameters and buffers kept)."""
        if isinstance(module, nn.BatchNorm1d) and not isinstance(module, cls):
            bn = cls(module.num_features, group=group, eps=module.eps, momentum=module.momentum,
                     affine=module.affine, track_running_stats=module.track_running_stats)  # fmt: skip
            bn.weight, bn.bias = module.weight, module.bias
            bn.running_mean, bn.running_var, bn.num_batches_tracked = module.running_mean, module.running_var, module.num_batches_tracked
            return bn
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child, group))
        return module

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.group is None or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"CrossRankBatchNorm1d expects [b, C] inputs, got {tuple(x.shape)}")
        # Statistics in at least fp32 whatever autocast made x (a bf16 count of 257 is 256), as
        # BatchNorm keeps them; fp64 stays fp64.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = xf.new_tensor([float(x.shape[0])])
        total = dist_fn.all_reduce(torch.cat([xf.sum(dim=0), count]), group=self.group)  # (C + 1,)
        n = total[-1]
        mean = total[:-1] / n  # (C,)
        centred = xf - mean
        var = dist_fn.all_reduce(centred.pow(2).sum(dim=0), group=self.group) / n  # (C,) biased, for the output
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps)
        y = y * self.weight + self.bias if self.affine else y
        return y.to(x.dtype)
