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
