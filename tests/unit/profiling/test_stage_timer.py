"""The stage timer tiles a step: every instant belongs to exactly one stage, the innermost."""
from __future__ import annotations

import time

import numpy as np
import torch

from profiling.stage_timer import STAGES, StageTimer


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_stages_take_their_time_from_the_enclosing_one() -> None:
    rng = np.random.default_rng()
    timer = StageTimer(torch.device("cpu"))
    timer.enter("vision_fwd")  # before the first step (warm-up): kept on the stack, not timed
    timer.leave()
    wants, started = [], time.perf_counter()
    for _ in range(2):
        a, b, c, d = rng.uniform(0.01, 0.03, size=4)
        wants.append({"data_wait": a, "loss": b, "vision_fwd": c, "other": d})
        timer.begin_step()
        with timer.stage("data_wait"):
            _busy(a)
        with timer.stage("loss"):
            _busy(b)
            with timer.stage("vision_fwd"):
                _busy(c)
        _busy(d)  # in no stage: "other"
    rows = timer.finish()
    wall = 1e3 * (time.perf_counter() - started)
    assert len(rows) == 2
    for row, want in zip(rows, wants):
        assert list(row) == [*STAGES, "overlapped_comm_ms"] and row["overlapped_comm_ms"] == 0.0
        for stage, seconds in want.items():
            # At least the busy time; a little more when this shared machine preempts the loop.
            assert 1e3 * seconds - 0.1 <= row[stage] < 1e3 * seconds + 10.0, (stage, row[stage], 1e3 * seconds)
        assert row["backward"] == 0.0 and min(row.values()) >= 0.0
    assert abs(sum(sum(r.values()) for r in rows) - wall) < 2.0  # the steps tile the measured time
    assert timer.finish() == []  # read once


def test_a_stage_left_by_an_exception_is_closed() -> None:
    timer = StageTimer(torch.device("cpu"))
    timer.begin_step()
    try:
        with timer.stage("backward"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert timer.current is None
    assert timer.finish()[0]["backward"] >= 0.0
