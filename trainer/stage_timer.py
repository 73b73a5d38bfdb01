"""Where a training step's time goes: a timeline of stages, marked from outside the step.

The profiler does not change the step it measures: it wraps the loader's `next`, the engine's
`backward` and `step`, DeepSpeed's gradient-reduction collectives, and puts forward hooks on
the two towers. Each of those marks the timeline when it starts and ends; the time between two
marks belongs to the stage that was innermost then. Stages therefore tile the step without
gaps or overlaps, and the part of the step no wrapper covers is reported as `other`.

Clocks: on a GPU, CUDA events recorded on the current stream (the step is synchronised once at
its end, so every event has completed when it is read); on the CPU, where every operation
(gloo collectives included) returns when it is done, the host's perf_counter.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch

# In the order they happen in a step. "loss" is everything in the forward outside the two towers:
# the projections, the SimCLR head, the loss with its all-gather, DeepSpeed's forward hooks.
STAGES = ("data_wait", "h2d", "vision_fwd", "text_fwd", "loss", "backward", "grad_reduce", "optimizer", "other")

# DeepSpeed's reductions of gradients (ZeRO 0 all-reduces, ZeRO 1-2 reduce-scatters or reduces).
# Called as `deepspeed.comm.<name>` by the engine and the ZeRO optimizers, so wrapping the
# package's attributes sees them; the loss's own collectives call torch.distributed directly and
# stay in the stage they run in.
_REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_fn", "reduce_scatter_tensor", "inference_all_reduce")


class StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._stack: list[str] = []
        self._marks: list[tuple[str, Any]] = []  # (stage that ends here, clock reading)

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _mark(self) -> None:
        self._marks.append((self._stack[-1] if self._stack else "other", self._now()))

    def begin_step(self) -> None:
        self._stack, self._marks = [], []
        self._mark()

    def enter(self, stage: str) -> None:
        self._mark()
        self._stack.append(stage)

    def leave(self) -> None:
        self._mark()
        self._stack.pop()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    @property
    def current(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def end_step(self) -> dict[str, float]:
        """Milliseconds per stage of the step just run (all of STAGES, zeros included)."""
        self._mark()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = dict.fromkeys(STAGES, 0.0)
        for (_, before), (stage, after) in zip(self._marks, self._marks[1:]):
            out[stage] += before.elapsed_time(after) if self.cuda else 1e3 * (after - before)
        return out


def _wrap(timer: StageTimer, stage: str, fn: Callable, only_in: str | None = None) -> Callable:
    def timed(*args: Any, **kwargs: Any) -> Any:
        if only_in is not None and timer.current != only_in:
            return fn(*args, **kwargs)
        with timer.stage(stage):
            return fn(*args, **kwargs)

    return timed


@contextlib.contextmanager
def instrument(timer: StageTimer, engine: Any) -> Iterator[None]:
    """Marks the engine's backward and step, DeepSpeed's gradient reductions during backward,
    and the forwards of the model's vision and text towers; all undone on exit."""
    import deepspeed.comm as ds_comm

    model = engine.module
    hooks = []
    for name, stage in (("visual", "vision_fwd"), ("text", "text_fwd")):
        tower = getattr(model, name, None)
        if tower is not None:
            hooks.append(tower.register_forward_pre_hook(lambda *_, s=stage: timer.enter(s)))
            hooks.append(tower.register_forward_hook(lambda *_: timer.leave()))
    saved_comm = {name: getattr(ds_comm, name) for name in _REDUCTIONS if hasattr(ds_comm, name)}
    for name, fn in saved_comm.items():
        setattr(ds_comm, name, _wrap(timer, "grad_reduce", fn, only_in="backward"))
    # Instance attributes shadow the class's methods; deleting them restores the originals.
    engine.backward = _wrap(timer, "backward", type(engine).backward.__get__(engine))
    engine.step = _wrap(timer, "optimizer", type(engine).step.__get__(engine))
    try:
        yield
    finally:
        del engine.backward, engine.step
        for name, fn in saved_comm.items():
            setattr(ds_comm, name, fn)
        for h in hooks:
            h.remove()
