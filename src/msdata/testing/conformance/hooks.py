"""The hooks every suite of a port that writes in the caller's transaction declares (outbox,
inbox, event store, checkpoints, idempotency keys): a test subclass implements them for its
backend."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from msdata.errors import ConfigurationError

__all__ = ["StoreUrlCases", "TransactionHooks"]


class TransactionHooks:
    """``begin(store)``: a transaction on the store's backend, open (a connection,
    session or handle that the store's write side takes as its caller's connection);
    ``commit(tx)`` / ``rollback(tx)``: end it, closing what ``begin`` opened."""

    async def begin(self, store: Any) -> Any:
        raise NotImplementedError

    async def commit(self, tx: Any) -> None:
        raise NotImplementedError

    async def rollback(self, tx: Any) -> None:
        raise NotImplementedError


class StoreUrlCases:
    """The cases of building a port's store with :func:`msdata.urls.store_from_url`: the
    port's suite mixes them in and names its ``port``; a test subclass implements
    :meth:`store_url` (else they are skipped)."""

    #: the port, as :data:`msdata.urls.STORES` names it (``"outbox"``, ``"idempotency"``...)
    port: ClassVar[str] = ""

    def store_url(self) -> str:
        """The URL of this backend's store (built from it, never connected)."""
        raise NotImplementedError

    @pytest.mark.parametrize("option", ["tabel_prefix", "notfy", "no_such_option"])
    def test_an_unknown_or_misspelt_option_is_refused_when_the_store_is_built(
        self, option: str
    ) -> None:
        """An option the store does not take (misspelt, or another backend's) is refused by
        ``store_from_url`` with a ConfigurationError naming it, not a raw TypeError from the
        constructor or a failure at the first call."""
        from msdata.urls import store_from_url

        try:
            url = self.store_url()
        except NotImplementedError:
            pytest.skip("implement store_url for this backend")
        with pytest.raises(ConfigurationError, match=option):
            store_from_url(self.port, url, **{option: "x"})
