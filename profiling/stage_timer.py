"""Where a training step's time goes: a timeline of stages, marked from outside the step.

The profiler does not change the step it measures: it wraps the loader's `next`, the engine's
`backward` and `step`, DeepSpeed's gradient reductions, and puts forward hooks on the two
towers. Each of those marks the timeline when it starts and ends; the time between two marks
belongs to the stage that was innermost then. Stages therefore tile each step without gaps or
overlaps, and the part of a step no wrapper covers is reported as `other`.

Clocks: on a GPU, CUDA events recorded on the compute stream (the stream the step was started
on), so that every mark is a point on one timeline; nothing synchronises the device between
steps, as nothing does in training, and the events are read once, after the last step. A
stage's time is then how long the compute stream took from one mark to the next, including
any wait for the host (which is how `data_wait` shows a stall). DeepSpeed's `overlap_comm`
issues its reductions on a side stream: those run behind the backward, so they are not a
stage but are summed apart (`overlapped_comm_ms`); what the step waits for at the end of the
backward (the reduction epilogue) is `grad_reduce`. On the CPU, where every operation (gloo
collectives included) returns when it is done, the clock is the host's perf_counter.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainer.engine import reductions_wrapped

# In the order they happen in a step. "loss" is everything in the forward outside the two towers:
# the projections, the SimCLR head, the loss with its all-gather, DeepSpeed's forward hooks.
STAGES = ("data_wait", "h2d", "vision_fwd", "text_fwd", "loss", "backward", "grad_reduce", "optimizer", "other")

class StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream: Any = None  # the compute stream, fixed at the first step
        self._stack: list[str] = []
        self._steps: list[list[tuple[str, Any]]] = []  # per step: (stage that ends here, clock reading)
        self._overlapped: list[list[tuple[Any, Any]]] = []  # per step: side-stream (start, end) events

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            return event
        return time.perf_counter()

    def _mark(self) -> None:
        if self._steps:  # before the first step (warm-up) the wrappers only keep the stack
            self._steps[-1].append((self.current or "other", self._now()))

    def begin_step(self) -> None:
        """Starts a measured step (and ends the previous one at the same instant)."""
        if self.cuda and self.stream is None:
            self.stream = torch.cuda.current_stream(self.device)
        now = self._now()
        if self._steps:
            self._steps[-1].append((self.current or "other", now))
        self._steps.append([("start", now)])
        self._overlapped.append([])

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

    def on_side_stream(self) -> bool:
        return self.cuda and self.stream is not None and torch.cuda.current_stream(self.device) != self.stream

    @contextlib.contextmanager
    def overlapped(self) -> Iterator[None]:
        """A collective issued on a side stream: timed on that stream, outside the tiling."""
        if not self._steps:
            yield
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._overlapped[-1].append((start, end))

    def finish(self) -> list[dict[str, float]]:
        """Ends the last step and reads every clock: per measured step, milliseconds per stage
        (all of STAGES) and `overlapped_comm_ms`. Synchronises the device once."""
        if not self._steps:
            return []
        self._steps[-1].append((self.current or "other", self._now()))
        if self.cuda:
            torch.cuda.synchronize(self.device)
        rows = []
        for marks, side in zip(self._steps, self._overlapped):
            row = dict.fromkeys(STAGES, 0.0)
            for (_, before), (stage, after) in zip(marks, marks[1:]):
                row[stage] += before.elapsed_time(after) if self.cuda else 1e3 * (after - before)
            row["overlapped_comm_ms"] = sum(a.elapsed_time(b) for a, b in side)
            rows.append(row)
        self._steps, self._overlapped = [], []
        return rows


def _reduction(timer: StageTimer, fn: Callable, stage: str = "grad_reduce") -> Callable:
    """A gradient reduction: a stage when the backward waits for it, apart when it overlaps."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        if timer.current != "backward":  # e.g. the optimizer's grad-norm all-reduce stays `optimizer`
            return fn(*args, **kwargs)
        if timer.on_side_stream():
            with timer.overlapped():
                return fn(*args, **kwargs)
        with timer.stage(stage):
            return fn(*args, **kwargs)

    return timed


def _staged(timer: StageTimer, stage: str, fn: Callable) -> Callable:
    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.stage(stage):
            return fn(*args, **kwargs)

    return timed


@contextlib.contextmanager
def instrument(timer: StageTimer, engine: Any) -> Iterator[None]:
    """Marks the engine's backward and step, DeepSpeed's gradient reductions during backward
    (the loss's own collectives stay in the stage they run in), and the forwards of the model's
    vision and text towers; all undone on exit."""
    model = engine.module
    hooks = []
    for name, stage in (("visual", "vision_fwd"), ("text", "text_fwd")):
        tower = getattr(model, name, None)
        if tower is not None:
            hooks.append(tower.register_forward_pre_hook(lambda *_, s=stage: timer.enter(s)))
            hooks.append(tower.register_forward_hook(lambda *_: timer.leave()))
    engine.backward = _staged(timer, "backward", type(engine).backward.__get__(engine))
    engine.step = _staged(timer, "optimizer", type(engine).step.__get__(engine))
    try:
        with reductions_wrapped(engine, lambda fn: _reduction(timer, fn)):
            yield
    finally:
        del engine.backward, engine.step
        for h in hooks:
            h.remove()
