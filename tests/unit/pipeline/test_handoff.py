"""DALI's outputs stay referenced until torch's last use of them has run, on a fake stream and fake events."""
from __future__ import annotations

import gc
import weakref

import torch

from pipeline.handoff import Handoff


class Stream:
    cuda_stream = 0xC0FFEE  # what DALI is told to run on


class Event:
    made: list[Event] = []

    def __init__(self) -> None:
        self.done, self.stream, self.waited = False, None, False
        Event.made.append(self)

    def record(self, stream) -> None:
        self.stream = stream

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


class Outputs:
    """Stands for DALI's TensorLists: the buffers live as long as this does."""


class Pipe:
    def __init__(self) -> None:
        self.streams: list = []

    def run(self, *stream):
        self.streams.append(stream)
        return Outputs()


def _handoff(device: str = "cuda") -> Handoff:
    Event.made.clear()
    return Handoff(torch.device(device), stream=Stream, event=Event)


def test_outputs_live_until_the_event_after_their_last_use_has_run() -> None:
    handoff, pipe = _handoff(), Pipe()
    first = handoff.run(pipe)
    assert pipe.streams == [(Stream.cuda_stream,)]  # DALI runs on torch's stream
    alive = weakref.ref(first)
    handoff.retire(first)
    del first
    gc.collect()
    assert alive() is not None and Event.made[0].stream is not None  # held: the work reading it may not have run
    second = handoff.run(pipe)
    gc.collect()
    assert alive() is not None and handoff.held == 1  # its event has not completed yet
    Event.made[0].done = True
    handoff.retire(second)
    handoff.run(pipe)
    gc.collect()
    assert alive() is None and handoff.held == 1  # released once its event completed; the second still held


def test_release_stops_at_the_first_pending_event_and_close_waits_for_all() -> None:
    handoff, pipe = _handoff(), Pipe()
    refs = []
    for _ in range(3):
        out = handoff.run(pipe)
        refs.append(weakref.ref(out))
        handoff.retire(out)
        del out
    Event.made[1].done = True  # a later one done before an earlier: events on one stream do not, but be safe
    handoff.run(pipe)
    assert handoff.held == 3
    handoff.close()
    gc.collect()
    assert handoff.held == 0 and all(e.waited for e in Event.made) and all(r() is None for r in refs)


def test_on_the_cpu_nothing_is_held_and_no_stream_is_named() -> None:
    handoff, pipe = _handoff("cpu"), Pipe()
    out = handoff.run(pipe)
    handoff.retire(out)
    assert pipe.streams == [()] and handoff.held == 0 and Event.made == []
