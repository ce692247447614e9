"""``from_url`` conveniences: pick the adapter by the URL's scheme.

Each adapter is also built from explicit objects (a client, a pool); these only save the
wiring. The adapter's driver is imported when its scheme is used, never before, and a
missing one raises :class:`msdata.errors.MissingDependencyError` naming the extra.

- transports: ``memory://``, ``redis://`` / ``rediss://`` / ``unix://``, ``amqp://`` /
  ``amqps://``, ``nats://`` / ``tls://``
"""

from __future__ import annotations

import re
from typing import Any

from msdata.errors import ConfigurationError
from msdata.transport import Transport

__all__ = ["redact_url", "transport_from_url"]

# userinfo: after "//" (or at the start, for a URL whose "//" was mistyped) up to the last "@"
# before the host ends; secrets in a query string or a libpq key=value DSN
_USERINFO = re.compile(r"(^|//)([^/?#\s]*)@")
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s])[\w.-]*(?:pass|pwd|secret|token|key|auth|credential)[\w.-]*\s*=\s*)"
    r"('[^']*'|[^&;#\s]*)"
)
_REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``, for errors, log lines and reprs.

    A password (``user:***@host``), a userinfo without a password (``***@host``: NATS and
    others read it as a token), and the values of query or key=value parameters whose name
    says secret (``password=``, ``sslpassword=``, ``token=``, ``auth_key=``...) are replaced.
    Works on malformed URLs too (a mistyped scheme is when an error shows the URL), and on
    several comma-separated URLs. Anything else is kept, so the error stays useful.
    """

    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:{_REDACTED}@" if colon else f"{m.group(1)}{_REDACTED}@"

    return _SECRET_PARAM.sub(rf"\1{_REDACTED}", _USERINFO.sub(userinfo, url))


def transport_from_url(url: str, **options: Any) -> Transport:
    """A transport for ``url``; ``options`` go to the adapter's ``from_url``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from msdata.adapters.memory import MemoryTransport

        if options:
            raise ConfigurationError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryTransport.from_url(url)
    if scheme in ("redis", "rediss", "unix"):
        from msdata.adapters.redis import RedisTransport

        return RedisTransport.from_url(url, **options)
    if scheme in ("amqp", "amqps"):
        from msdata.adapters.rabbitmq import RabbitMQTransport

        return RabbitMQTransport.from_url(url, **options)
    if scheme in ("nats", "tls"):
        from msdata.adapters.nats import NatsTransport

        return NatsTransport.from_url(url, **options)
    raise ConfigurationError(
        f"no transport for {redact_url(url)!r}: use memory://, redis://, amqp:// or nats://"
    )
