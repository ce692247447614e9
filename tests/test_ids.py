"""new_id builds its text from a cached head: it must be exactly str(UUID) of the id that
_next_int would have made from the same state, across millisecond changes and carries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic_core import to_json

from msdata import ids


@pytest.fixture(autouse=True)
def _restore_state() -> Iterator[None]:
    saved = (ids._last_ms, ids._tail, ids._head, ids._rand)
    # the start of a new millisecond's tail, fixed so the two ways of making an id agree
    ids._rand = lambda bits: 0x1_2345_6789_ABCD_EF01_2345 & ((1 << bits) - 1)
    yield
    ids._last_ms, ids._tail, ids._head, ids._rand = saved


# a millisecond far in the future, so the counter path (not the clock) decides the id
_FUTURE_MS = st.integers(min_value=(1 << 47), max_value=(1 << 48) - 2)
# tails near a carry out of the low 48 bits, near the end of the millisecond, and anywhere
_TAIL = st.one_of(
    st.integers(min_value=0, max_value=(1 << 74) - 1),
    st.integers(min_value=0, max_value=(1 << 26) - 1).map(lambda h: h << 48 | 0xFFFF_FFFF_FFFF),
    st.integers(min_value=(1 << 74) - 3, max_value=(1 << 74) - 1),
)


@given(ms=_FUTURE_MS, tails=st.lists(_TAIL, min_size=1, max_size=5))
def test_new_id_is_the_text_of_the_uuid7_of_the_same_state(ms: int, tails: list[int]) -> None:
    for tail in tails:  # several in a row: the cached head is reused or replaced
        ids._last_ms, ids._tail = ms, tail
        text = ids.new_id()
        ids._last_ms, ids._tail = ms, tail
        expected = uuid.UUID(int=ids._next_int())
        assert text == str(expected)
        assert expected.version == 7 and expected.variant == uuid.RFC_4122


def test_new_ids_are_strictly_increasing_across_milliseconds() -> None:
    made = [ids.new_id() for _ in range(5000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(str(uuid.UUID(m)) == m for m in made)


@given(ms=_FUTURE_MS, tail=_TAIL, n=st.integers(min_value=0, max_value=600))
def test_new_ids_are_the_ids_new_id_would_make(ms: int, tail: int, n: int) -> None:
    """A batch (publish_many) is n calls of new_id in one: the same texts, the same state
    after, across blocks of 256, carries out of the low 48 bits and the end of a ms."""
    ids._last_ms, ids._tail = ms, tail
    batch = ids.new_ids(n)
    after = (ids._last_ms, ids._tail)
    ids._last_ms, ids._tail = ms, tail
    assert batch == [ids.new_id() for _ in range(n)]
    assert after == (ids._last_ms, ids._tail)


def test_new_ids_continue_the_order_of_new_id() -> None:
    made = [ids.new_id(), *ids.new_ids(700), ids.new_id(), *ids.new_ids(1), *ids.new_ids(300)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(str(uuid.UUID(m)) == m and uuid.UUID(m).version == 7 for m in made)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# clock readings in ns: anywhere in 2000-2100, and right at and around second boundaries
_SECOND = st.integers(min_value=946_684_800, max_value=4_102_444_800)
_NS = st.one_of(
    st.integers(min_value=946_684_800 * 10**9, max_value=4_102_444_800 * 10**9),
    st.tuples(_SECOND, st.sampled_from([-1000, -1, 0, 999, 1000, 1001, 999_999])).map(
        lambda t: t[0] * 10**9 + t[1]
    ),
)


@given(readings=st.lists(_NS, min_size=1, max_size=8))
def test_new_id_time_takes_the_id_and_the_time_from_one_reading(readings: list[int]) -> None:
    """The time is the reading to the microsecond, its text what pydantic-core writes for
    it (across second boundaries, with and without a fraction); the id is the one new_id
    makes from the same state and reading, and ids keep increasing whatever the clock does
    (these readings go back and forth)."""
    saved = ids._time_ns
    made: list[str] = []
    try:
        for ns in readings:
            ids._time_ns = lambda ns=ns: ns  # type: ignore[misc]
            state = (ids._last_ms, ids._tail)
            msg_id, when, text = ids.new_id_time()
            assert when == _EPOCH + timedelta(microseconds=ns // 1000)
            assert when.tzinfo is UTC and type(when) is datetime
            assert text == to_json(when).decode()
            if ns // 1_000_000 > state[0]:  # the clock moved on: the id's ms is the reading's
                assert uuid.UUID(msg_id).int >> 80 == ns // 1_000_000
            after = (ids._last_ms, ids._tail)
            ids._last_ms, ids._tail = state
            assert ids.new_id() == msg_id
            assert (ids._last_ms, ids._tail) == after
            made.append(msg_id)
    finally:
        ids._time_ns = saved
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(uuid.UUID(m).version == 7 and str(uuid.UUID(m)) == m for m in made)


def test_new_id_time_on_the_real_clock_keeps_order_with_new_id() -> None:
    made = []
    for i in range(3000):
        if i % 3:
            msg_id, when, text = ids.new_id_time()
            assert text == to_json(when).decode()
        else:
            msg_id = ids.new_id()
        made.append(msg_id)
    assert made == sorted(made) and len(set(made)) == len(made)
