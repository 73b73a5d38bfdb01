"""The search behind `slip profile loss --fit`: the largest batch that fits, in few probes."""
import math

import numpy as np
import pytest

from profiling.loss_bench import largest_fitting


@pytest.mark.parametrize("seed", range(5))
def test_the_largest_fitting_batch_is_found_from_below_and_above(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        limit = int(rng.integers(0, 3_000_000))  # the true largest batch that fits, in rows
        start = int(rng.integers(1, 2_000_000))
        probes = []

        def fits(b: int, limit=limit, probes=probes) -> bool:
            probes.append(b)
            return b <= limit

        got = largest_fitting(fits, start)
        assert got == limit // 1024 * 1024, (limit, start, got)
        assert all(b % 1024 == 0 and b > 0 for b in probes)
        assert len(probes) <= 2 * math.log2(2**24 / 1024) + 2


def test_the_search_stops_at_its_cap() -> None:
    assert largest_fitting(lambda b: True, 1024, cap=2**20) == 2**20
    assert largest_fitting(lambda b: False, 32768) == 0


def test_the_line_through_two_probes_meets_the_budget_where_linear_memory_does() -> None:
    from profiling.loss_bench import bisect_fitting, linear_guess

    fixed, per_row, budget = 300 * 2**20, 6144, 8 * 2**30  # bytes: a workspace, and each row's share
    peak = lambda b: fixed + per_row * b  # noqa: E731
    guess = linear_guess((32768, peak(32768)), (65536, peak(65536)), budget)
    assert guess % 1024 == 0 and peak(guess) <= budget < peak(guess + 1024)
    # A guess that does not fit (memory grows faster than the line) is bisected down to the truth.
    quadratic = lambda b: b * b * 8 <= budget  # noqa: E731
    assert bisect_fitting(quadratic, 2048, 200_000) == int((budget / 8) ** 0.5) // 1024 * 1024
