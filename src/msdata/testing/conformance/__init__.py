"""One conformance suite per port, written once and run against every adapter: subclass
the suite's base class, implement its abstract ``make_*()`` factory and set its features
record. Needs pytest and pytest-asyncio."""
