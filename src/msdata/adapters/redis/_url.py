"""The one reading of a ``redis://`` URL for msdata's Redis adapters (the transport and the
idempotency store): redis-py hands any query parameter it does not know to its connection
class, whose constructor then fails with a ``TypeError`` at the first command, and reads a
database path that is not a number as database 0. Both are refused here, when the adapter
is built."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, Connection, parse_url

from msdata.errors import ConfigurationError
from msdata.storage import init_keywords
from msdata.urls import redact_url

__all__ = ["redis_client"]

#: the pool's own keywords (the others go to each connection)
_POOL_KEYWORDS = frozenset({"max_connections", "connection_class"})


def _keywords(cls: type) -> frozenset[str]:
    """The keywords ``cls(...)`` takes, following ``**kwargs`` passed up to the bases."""
    return frozenset(init_keywords(cls, positional=True)[0])


def _refuse(kind: str, name: str, own: Sequence[str], takes: frozenset[str], where: str) -> None:
    known = sorted(URL_QUERY_ARGUMENT_PARSERS)
    near = difflib.get_close_matches(name, [*own, *sorted(takes | _POOL_KEYWORDS)], 1, 0.7)
    hint = f" (did you mean {near[0]}?)" if near else ""
    ours = f"{', '.join(own)}; and " if own else ""
    raise ConfigurationError(
        f"unknown {kind} {name!r}{hint}: {where} takes {ours}redis-py's {', '.join(known)} "
        "(or another keyword of its connection class)"
    )


def redis_client(url: str, where: str, own: Sequence[str] = (), **options: Any) -> aioredis.Redis:
    """``redis.asyncio.Redis.from_url(url, decode_responses=False, **options)``, once the URL
    and the options are checked: :class:`ConfigurationError` for a query parameter or an
    option that redis-py's connection takes under no name (``socket_timout``), a value
    redis-py cannot read (``db=x``), and a ``redis://`` database path that is not a
    number (``/abc``). ``where`` names the adapter in the message, ``own`` the options it
    took out of the URL itself (listed as accepted too)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?(\d+)?", parts.path):
        raise ConfigurationError(
            f"the database of {redact_url(url)!r} must be a number "
            f"(redis://host:6379/0), not {parts.path[1:]!r}"
        )
    try:
        parsed = parse_url(url)
    except ValueError as e:
        raise ConfigurationError(f"{where}: {e}") from None
    takes = _keywords(parsed.get("connection_class", Connection))
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if name not in takes and name not in _POOL_KEYWORDS:
            _refuse("URL option", name, own, takes, where)
    for name in options:
        if name not in takes and name not in _POOL_KEYWORDS:
            _refuse("option", name, own, takes, where)
    return aioredis.Redis.from_url(url, decode_responses=False, **options)
