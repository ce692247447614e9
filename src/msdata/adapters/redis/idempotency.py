"""The idempotency store on Redis: one hash per (scope, key), changed by Lua scripts.

Each step is one script, so it is atomic on the server and one round trip: the claim reads
the hash and, if it is missing or its ``exp`` is not after the caller's ``now``, writes a
new IN_PROGRESS hash (a replay is the same single call, returning the stored fields);
complete and release act only if the hash still carries the claim's token. Expiry is
decided by the ``now`` the caller passes (its clock), never by Redis; each hash also gets a
Redis TTL of its remaining time plus a minute, so Redis forgets it some time after it
expired. Redis does not join a database transaction: use it for effects outside a database.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Self

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from msdata.adapters.redis._url import redis_client
from msdata.adapters.redis.transport import _address_of
from msdata.clock import SYSTEM_CLOCK, Clock
from msdata.errors import ConfigurationError, StoreError
from msdata.idempotency.store import (
    IdempotencyRecord,
    IdempotencyStoreFeatures,
    LiveRecord,
    TokenFactory,
    check_purge_time,
)
from msdata.storage import from_unix_us
from msdata.storage import unix_us as _us

__all__ = ["RedisIdempotencyStore"]

_GRACE_MS = 60_000

# KEYS[1] the hash; ARGV: fingerprint, token, now (µs), lease end (µs), Redis TTL (ms).
# Returns nil when this call claimed the key, else {fp, c, resp, tok} of the live one.
_CLAIM = """
local cur = redis.call('HMGET', KEYS[1], 'exp', 'fp', 'c', 'resp', 'tok')
if cur[1] and tonumber(cur[1]) > tonumber(ARGV[3]) then
  return {cur[2], cur[3], cur[4], cur[5]}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'c', '0', 'exp', ARGV[4], 'tok', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return nil
"""

# KEYS[1]; ARGV: token, response, retention end (µs), Redis TTL (ms). 1 if completed.
_COMPLETE = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'c', '1', 'resp', ARGV[2], 'exp', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1]; ARGV[1] token. 1 if deleted.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


def _record(scope: str, key: str, fields: Any) -> IdempotencyRecord:
    exp, fp, completed, tok, resp = fields
    return IdempotencyRecord(
        scope,
        key,
        fp.decode(),
        completed == b"1",
        from_unix_us(int(exp)),
        tok.decode(),
        resp,
    )


class RedisIdempotencyStore:
    """The :class:`msdata.idempotency.IdempotencyStore` on Redis (async only; ``conn`` must
    be None). ``client``: a ``redis.asyncio.Redis`` (``decode_responses=False``). Keys:
    ``{key_prefix}{len(scope)}:{scope}:{key}``."""

    features = IdempotencyStoreFeatures(
        joins_transaction=False, sync=False, sync_own_transaction=False
    )

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "msdata:idem:",
        owns_client: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not isinstance(key_prefix, str):
            raise ConfigurationError("key_prefix must be a string")
        #: the clock a completed record's Redis TTL is counted on (the caller's, as expiry is)
        self.clock = clock
        self._r = client
        self.key_prefix = key_prefix
        self._owns = owns_client
        self._claim_sha = hashlib.sha1(_CLAIM.encode()).hexdigest()
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str = "msdata:idem:",
        clock: Clock = SYSTEM_CLOCK,
        **options: Any,
    ) -> RedisIdempotencyStore:
        """A store over ``redis://…`` with a client of its own (closed by ``close``);
        ``options`` go to redis-py. ConfigurationError, naming it, for a URL parameter or an
        option redis-py does not take (``namespace``: this store's is ``key_prefix``) and a
        database path that is not a number."""
        return cls(
            redis_client(url, "the Redis idempotency store", (), **options),
            key_prefix=key_prefix,
            clock=clock,
            owns_client=True,
        )

    @property
    def address(self) -> str:
        """The server, as ``redis://host:port/db`` without credentials (what errors name)."""
        return _address_of(self._r) or "the Redis server"

    def _key(self, scope: str, key: str) -> str:
        return f"{self.key_prefix}{len(scope)}:{scope}:{key}"

    @staticmethod
    def _no_conn(conn: Any) -> None:
        if conn is not None:
            raise ConfigurationError(
                "the Redis idempotency store does not join a database transaction: pass conn=None"
            )

    async def claim_async(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord:
        if conn is not None:
            self._no_conn(conn)
        ttl_ms = (
            max(0, (until_us - now_us) // 1000) + _GRACE_MS
        )  # Redis forgets it a minute after it expires
        # EVALSHA straight away (the replay path: redis-py's Script object costs a few us);
        # the script writes the token only when it claims, but needs it beforehand
        token = new_token()
        args = (self._key(scope, key), fingerprint, token, now_us, until_us, ttl_ms)
        try:
            try:
                cur = await self._r.evalsha(self._claim_sha, 1, *args)
            except NoScriptError:  # a new or flushed server: load it once
                await self._r.script_load(_CLAIM)
                cur = await self._r.evalsha(self._claim_sha, 1, *args)
        except RedisError as e:
            raise StoreError(f"idempotency claim at {self.address}: {type(e).__name__}: {e}") from e
        if cur is None:
            return token
        fp, completed, response, tok = cur
        return (fp.decode(), completed == b"1", response, tok.decode())

    async def complete_async(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        self._no_conn(conn)
        ttl = max(0, (until_us - _us(self.clock.now())) // 1000) + _GRACE_MS
        try:
            done = await self._complete(
                keys=[self._key(scope, key)], args=(token, response, until_us, ttl)
            )
        except RedisError as e:
            raise StoreError(
                f"idempotency complete at {self.address}: {type(e).__name__}: {e}"
            ) from e
        return bool(done)

    async def release_async(self, conn: Any, scope: str, key: str, token: str) -> bool:
        self._no_conn(conn)
        try:
            return bool(await self._release(keys=[self._key(scope, key)], args=(token,)))
        except RedisError as e:
            raise StoreError(
                f"idempotency release at {self.address}: {type(e).__name__}: {e}"
            ) from e

    def _sync(self) -> Any:
        raise ConfigurationError("the Redis idempotency store is async only: use the *_async calls")

    def claim(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now_us: int,
        until_us: int,
        new_token: TokenFactory,
    ) -> str | LiveRecord:
        return self._sync()  # type: ignore[no-any-return]

    def complete(
        self, conn: Any, scope: str, key: str, token: str, response: bytes, until_us: int
    ) -> bool:
        return self._sync()  # type: ignore[no-any-return]

    def release(self, conn: Any, scope: str, key: str, token: str) -> bool:
        return self._sync()  # type: ignore[no-any-return]

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        try:
            fields: Any = await self._r.hmget(
                self._key(scope, key), ["exp", "fp", "c", "tok", "resp"]
            )
        except RedisError as e:
            raise StoreError(f"idempotency get at {self.address}: {type(e).__name__}: {e}") from e
        return None if fields[0] is None else _record(scope, key, fields)

    async def purge(self, now: datetime) -> int:
        """Redis forgets expired keys itself (their TTL): nothing to do, returns 0."""
        check_purge_time(now)
        return 0

    def schema_sql(self) -> str:
        return ""

    async def create_schema(self) -> None:
        return None

    async def close(self) -> None:
        if self._owns:
            await self._r.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
