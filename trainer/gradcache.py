"""GradCache: gradient accumulation that keeps every negative of the accumulated batch.

Plain accumulation splits a batch of b rows into m micro-batches of b/m and computes the
contrastive loss of each against its own b/m candidates: the loss (and the SimCLR head's
BatchNorm statistics) of a smaller batch. GradCache (Gao, Zhang, Han, Callan 2021,
"Scaling deep contrastive learning batch size under memory limited setup") keeps the
big-batch loss while only one micro-batch's tower activations live at a time:

1. tower features of each micro-batch without autograd (cheap to keep: [b, width]);
2. the heads (projections, SimCLR MLP with BatchNorm, logit scale) and the loss once on all
   the features, which are leaves; the loss's gradient w.r.t. each feature is cached;
3. each micro-batch's towers again with autograd, backward of <features, cached gradient>:
   by the chain rule its parameter gradient is that micro-batch's share of the big-batch
   loss's gradient. With the last micro-batch the heads and the loss run once more on the
   cached (now constant) features, and their backward gives the heads' own gradients.

The heads always see the whole local batch, so BatchNorm's batch statistics are exactly the
big batch's, and its running statistics are updated once, by phase 3: the step equals one
step on the big batch, up to float rounding. DeepSpeed is configured with
gradient_accumulation_steps = m and train_micro_batch_size_per_gpu = b / m; it reduces
and applies the optimizer at the m-th `step()`.

Why phase 3 recomputes the heads instead of keeping phase 2's graph (retain_graph): under
ZeRO-3 a module's parameters are re-gathered for backward by a hook armed once per
forward, so a second backward through one forward finds them still partitioned (empty).
The heads are small next to the towers; running them twice costs little.

    cache = GradCache(task, micro_batches=4)
    losses = cache.loss(engine, batch)   # phases 1-2; losses are detached, for logging
    if torch.isfinite(losses["loss"]):
        cache.backward_and_step(engine)  # phase 3: m backward/step pairs, one optimizer update
    else:
        cache.discard()                  # the model (BatchNorm running statistics too) is untouched
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainer.engine import heads_callable
from trainer.task import Model, TrainingTask


@dataclass
class _RngState:
    cpu: Tensor
    cuda: dict[int, Tensor]  # device index -> that device's generator state


def _rng_devices(chunk: dict[str, Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in chunk.values() if t.device.type == "cuda"})


def _get_rng(devices: list[int]) -> _RngState:
    return _RngState(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})


def _set_rng(state: _RngState) -> None:
    torch.set_rng_state(state.cpu)
    for d, s in state.cuda.items():
        torch.cuda.set_rng_state(s, d)


@contextmanager
def _running_stats_unchanged(module: Model) -> Iterator[None]:
    """BatchNorm layers run in training mode (batch statistics) but leave their running
    statistics as they were. The buffers are swapped for copies rather than restored in
    place: autograd may have saved them for backward."""
    modules = module.modules() if isinstance(module, nn.Module) else ()
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [{n: getattr(m, n) for n in names} for m in norms]
    try:
        for m, buffers in zip(norms, kept):
            for n, b in buffers.items():
                if b is not None:
                    setattr(m, n, b.clone())
        yield
    finally:
        for m, buffers in zip(norms, kept):
            for n, b in buffers.items():
                setattr(m, n, b)


@dataclass
class _Pending:
    """What phase 3 needs: the chunks, their RNG states, the cached features and their
    loss gradients."""

    chunks: list[dict[str, Tensor]]
    rng: list[_RngState]  # before each chunk's phase-1 forward
    rng_heads: _RngState  # before phase 2's heads, so phase 3's rerun draws the same
    rng_after: _RngState  # after phase 2, restored once phase 3 has replayed everything
    features: dict[str, Tensor]  # name -> (b, width), constants
    grads: list[dict[str, Tensor]]  # per chunk: feature name -> dL/dfeature, (b/m, width)


class GradCache:
    """Big-batch contrastive steps in micro_batches equal chunks of the local batch."""

    def __init__(self, task: TrainingTask, micro_batches: int) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.task, self.micro_batches = task, micro_batches
        self._pending: _Pending | None = None

    def loss(self, model: Model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Phases 1-2 on the local batch: the same dict as task(model, batch), detached.

        Gradients are not applied: call backward_and_step (or discard) next."""
        if self._pending is not None:
            raise RuntimeError("GradCache.loss called twice: call backward_and_step or discard after each loss")
        chunks = self._split(self.task.model_inputs(batch))
        devices = _rng_devices(chunks[0])
        # Phase 1: tower features without autograd. The RNG state before each chunk is kept
        # so that phase 3 draws the same randomness (dropout, drop-path) and recomputes
        # exactly these features.
        rng: list[_RngState] = []
        parts: list[dict[str, Tensor]] = []
        with torch.no_grad():
            for chunk in chunks:
                rng.append(_get_rng(devices))
                parts.append(self.task.towers(model, chunk))  # name -> (b/m, width)
        # Leaves: the loss's gradient stops here instead of flowing into the towers.
        features = {k: torch.cat([p[k] for p in parts]).requires_grad_() for k in parts[0]}  # name -> (b, width)
        del parts
        # Phase 2: heads and loss once on the whole local batch (the loss gathers over ranks).
        # BatchNorm's running statistics are left to phase 3, so a discarded step leaves none.
        heads, context = heads_callable(model)
        rng_heads = _get_rng(devices)
        with context, _running_stats_unchanged(heads):
            losses = self.task.heads_and_loss(heads, features)
        names = list(features)
        grads = torch.autograd.grad(losses["loss"], [features[k] for k in names], allow_unused=True)
        size = chunks[0][next(iter(chunks[0]))].shape[0]
        per_chunk: list[dict[str, Tensor]] = [{} for _ in chunks]
        for name, grad in zip(names, grads):
            grad = torch.zeros_like(features[name]) if grad is None else grad  # (b, width)
            for i, g in enumerate(grad.split(size)):
                per_chunk[i][name] = g  # (b/m, width)
        constants = {k: f.detach() for k, f in features.items()}  # (b, width) each
        self._pending = _Pending(chunks, rng, rng_heads, _get_rng(devices), constants, per_chunk)
        return {k: v.detach() for k, v in losses.items()}

    def backward_and_step(self, engine: Any) -> None:
        """Phase 3: per chunk, towers with autograd, engine.backward, engine.step.

        DeepSpeed applies the optimizer at the micro_batches-th step (its accumulation
        boundary), after reducing the gradients accumulated over all chunks."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("GradCache.backward_and_step called without a preceding GradCache.loss")
        self._pending = None
        last = len(pending.chunks) - 1
        for i, (chunk, rng, grads) in enumerate(zip(pending.chunks, pending.rng, pending.grads)):
            head_loss = None
            if i == last:
                # The heads and the loss again, on the cached features (constants now): their
                # backward gives the heads' parameter gradients, and BatchNorm's running
                # statistics are updated once, with the big batch's statistics. Run before
                # this chunk's towers on purpose: autograd runs later-created nodes first, so
                # the backward reaches the towers' outputs, whose engine hooks open
                # DeepSpeed's backward bookkeeping, before any head parameter's gradient.
                heads, context = heads_callable(engine)
                _set_rng(pending.rng_heads)
                with context:
                    head_loss = self.task.heads_and_loss(heads, pending.features)["loss"]
            _set_rng(rng)
            features = self.task.towers(engine, chunk)  # name -> (b/m, width), with autograd
            # d/dtheta <f(theta), g> = (df/dtheta)^T g: this chunk's share of dL/dtheta.
            # In fp32 whatever the autocast dtype of f: the cached gradient is fp32.
            surrogate = sum((features[k].float() * grads[k].float()).sum() for k in grads)
            if head_loss is not None:
                surrogate = surrogate + head_loss
            # The surrogate already carries the full local-batch loss's gradient: no 1/GAS.
            engine.backward(surrogate, scale_wrt_gas=False)
            engine.step()
            del features, surrogate, head_loss
        _set_rng(pending.rng_after)

    def discard(self) -> None:
        """Drop the cached features and gradients (a skipped step): nothing was applied."""
        self._pending = None

    def _split(self, inputs: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        sizes = {k: v.shape[0] for k, v in inputs.items()}
        b = next(iter(sizes.values()))
        if any(s != b for s in sizes.values()):
            raise ValueError(f"batch entries have different lengths: {sizes}")
        if b % self.micro_batches:
            raise ValueError(f"local batch {b} is not divisible into {self.micro_batches} micro-batches")
        size = b // self.micro_batches
        return [{k: v[i * size : (i + 1) * size] for k, v in inputs.items()} for i in range(self.micro_batches)]
