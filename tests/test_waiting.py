"""msdata.testing.eventually: the one way tests wait."""

from __future__ import annotations

import pytest

from msdata.testing import eventually


async def test_eventually_returns_once_true_and_fails_the_test_saying_how_far_it_got() -> None:
    calls = 0

    async def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    await eventually(third_time, 5.0, interval=0.001)
    assert calls == 3
    seen = [1, 2]
    with pytest.raises(AssertionError, match=r"not true after 0\.05 s: 2 of 5 arrived"):
        await eventually(lambda: len(seen) == 5, 0.05, what=lambda: f"{len(seen)} of 5 arrived")
    with pytest.raises(AssertionError, match="the queue drains"):
        await eventually(lambda: False, 0.01, what="the queue drains")
