"""Request fingerprints: the hash stored with a key, so a key reused for a different request
is told apart from a retry (IETF draft-ietf-httpapi-idempotency-key-header, "fingerprint")."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic_core import PydanticSerializationError, to_jsonable_python

from msdata.errors import ConfigurationError

__all__ = ["canonical_json", "fingerprint", "http_fingerprint"]


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON (UTF-8 bytes): pydantic models, dataclasses, UUIDs and
    datetimes through pydantic's JSON mode, object keys sorted, no whitespace, NaN refused.
    Two equal requests give the same bytes whatever their key order.

    Raises ConfigurationError for a value pydantic cannot turn into JSON, or whose text is
    not UTF-8 (a lone surrogate)."""
    try:
        plain = to_jsonable_python(value)
        text = json.dumps(
            plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode()
    except (PydanticSerializationError, TypeError, ValueError) as e:  # UnicodeError too
        raise ConfigurationError(
            f"cannot fingerprint a {type(value).__qualname__}: it has no JSON form ({e}); "
            "exclude it or pass fingerprint= yourself"
        ) from e


def fingerprint(request: Any) -> str:
    """The hex sha256 of ``canonical_json(request)`` (64 characters)."""
    return hashlib.sha256(canonical_json(request)).hexdigest()


def http_fingerprint(method: str, path: str, query: bytes | str, body: bytes) -> str:
    """The hex sha256 of an HTTP request's method, path, query string and body bytes
    (the body as sent: two JSON bodies that differ only in spacing differ)."""
    h = hashlib.sha256()
    q = query.encode() if isinstance(query, str) else query
    for part in (method.upper().encode(), path.encode(), q):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    h.update(body)
    return h.hexdigest()
