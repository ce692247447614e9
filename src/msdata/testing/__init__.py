"""Conformance suites and helpers for testing msdata adapters, shipped with the package so
that a user's own adapter can run the same suites. The suites need pytest and
pytest-asyncio; :func:`eventually` and :class:`FakeClock` need nothing."""

from msdata.testing.fakes import FakeClock
from msdata.testing.waiting import eventually

__all__ = ["FakeClock", "eventually"]
