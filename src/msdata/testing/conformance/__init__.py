"""One conformance suite per port, written once and run against every adapter: subclass
the suite's base class and implement its abstract ``make_*()`` factory and hooks; what the
backend can do comes from the store's own ``features`` record. Needs pytest and
pytest-asyncio.

- :mod:`msdata.testing.conformance.outbox`: the outbox store (``OutboxStoreConformance``)
- :mod:`msdata.testing.conformance.relay`: ``OutboxRelay`` over an outbox store
  (``OutboxRelayConformance``)
- :mod:`msdata.testing.conformance.inbox`: the inbox store (``InboxStoreConformance``)
- :mod:`msdata.testing.conformance.audit`: an outbox's audit source
  (``OutboxAuditConformance``, on the outbox suite's hooks)
- :mod:`msdata.testing.conformance.hooks`: ``TransactionHooks``, the begin/commit/rollback
  hooks of every suite whose port writes in the caller's transaction
"""
