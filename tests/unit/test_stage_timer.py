"""The stage timer tiles a step: every instant belongs to exactly one stage, the innermost."""
from __future__ import annotations

import time

import numpy as np
import torch

from trainer.stage_timer import STAGES, StageTimer


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_stages_take_their_time_from_the_enclosing_one() -> None:
    rng = np.random.default_rng()
    a, b, c, d = rng.uniform(0.01, 0.03, size=4)
    timer = StageTimer(torch.device("cpu"))
    start = time.perf_counter()
    timer.begin_step()
    with timer.stage("data_wait"):
        _busy(a)
    with timer.stage("loss"):
        _busy(b)
        with timer.stage("vision_fwd"):
            _busy(c)
    _busy(d)  # in no stage: "other"
    out = timer.end_step()
    wall = 1e3 * (time.perf_counter() - start)
    assert list(out) == list(STAGES)
    for stage, want in (("data_wait", a), ("loss", b), ("vision_fwd", c), ("other", d)):
        assert abs(out[stage] - 1e3 * want) < 3.0, (stage, out[stage], 1e3 * want)
    assert out["backward"] == 0.0
    assert abs(sum(out.values()) - wall) < 1.0  # the stages tile the step


def test_a_stage_left_by_an_exception_is_closed() -> None:
    timer = StageTimer(torch.device("cpu"))
    timer.begin_step()
    try:
        with timer.stage("backward"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert timer.current is None
    assert timer.end_step()["backward"] >= 0.0
