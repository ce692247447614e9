"""Conformance suites and helpers for testing msdata adapters, shipped with the package so
that a user's own adapter can run the same suites. Needs pytest and pytest-asyncio."""
