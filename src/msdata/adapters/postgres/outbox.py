"""The PostgreSQL outbox store: claims with ``FOR UPDATE SKIP LOCKED``, leases per row and
per partition key, LISTEN/NOTIFY wake-up, a table Debezium's outbox event router can read."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from types import MappingProxyType
from typing import Any, Self

import asyncpg

from msdata.adapters.postgres._db import (
    CallerSQL,
    Listener,
    PostgresDatabase,
    command_count,
)
from msdata.errors import ConfigurationError
from msdata.messages import safe_text
from msdata.outbox.store import (
    UNREADABLE_TIME,
    OutboxBatch,
    OutboxRecord,
    OutboxRow,
    OutboxStatus,
    OutboxStoreFeatures,
    UnreadableRow,
    read_header_dict,
    read_headers,
)
from msdata.storage import DEFAULT_TABLE_PREFIX, Connection, check_store_options, check_table_prefix
from msdata.transport import TransportMessage

__all__ = ["PostgresOutboxStore"]

log = logging.getLogger("msdata.outbox")

_COLUMNS = "id, topic, aggregatetype, aggregateid, type, payload, headers"

# Leases live in a small UNLOGGED side table, one row per claim, listing the rows it leased
# and their keys: a claim writes one small row and no WAL, and never rewrites the wide
# outbox rows. A database crash empties it, so every lease is gone and its rows are
# published again (at least once). Debezium never reads it.
_TABLE = """\
CREATE TABLE IF NOT EXISTS {table} (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            text NOT NULL,
    aggregatetype text,
    aggregateid   text,
    type          text NOT NULL,
    payload       bytea NOT NULL,
    topic         text NOT NULL,
    headers       jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz,
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    parked        boolean NOT NULL DEFAULT false,
    sent_at       timestamptz
);
CREATE INDEX IF NOT EXISTS "{name}_pending" ON {table} (seq) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS "{name}_sent" ON {table} (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS "{name}_parked" ON {table} (seq) WHERE parked;
CREATE INDEX IF NOT EXISTS "{name}_held" ON {table} (aggregateid, seq)
    WHERE sent_at IS NULL AND aggregateid IS NOT NULL AND (parked OR available_at IS NOT NULL);
CREATE UNLOGGED TABLE IF NOT EXISTS {lease} (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner text NOT NULL,
    until timestamptz NOT NULL,
    seqs  bigint[] NOT NULL,
    keys  text[] NOT NULL
);
"""

# The partitioned claim (``partitioned=True``). Every row carries ``part``, a hash of its
# partition key (of its id when it has none) modulo PARTITIONS, computed by the database at
# insert (a generated column: hand-written INSERTs get it too, and ``create_schema`` adds it
# to an existing table, computing it for the rows already there). Relays own partitions
# (``{parts}``: one row per partition, its owner), register and renew themselves in
# ``{relays}`` (a relay whose ``until`` has passed is gone), and record the rows they
# hold in flight, batch by batch, in ``{inflight}`` (rows and their partitions; a batch
# left with no rows is its relay's slot for its next batch, updated in place).
_PARTITION_TABLES = """\
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS part integer
    GENERATED ALWAYS AS ((hashtext(coalesce(aggregateid, id)) & 2147483647) % {n}) STORED;
CREATE UNLOGGED TABLE IF NOT EXISTS {parts} (
    part  integer PRIMARY KEY,
    owner text
);
INSERT INTO {parts} (part) SELECT g FROM generate_series(0, {n} - 1) g ON CONFLICT DO NOTHING;
CREATE UNLOGGED TABLE IF NOT EXISTS {relays} (
    owner text PRIMARY KEY,
    until timestamptz NOT NULL
);
ALTER TABLE {relays} ADD COLUMN IF NOT EXISTS floor bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cand bigint, ADD COLUMN IF NOT EXISTS cand_at timestamptz;
CREATE UNLOGGED TABLE IF NOT EXISTS {inflight} (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner text NOT NULL,
    until timestamptz NOT NULL,
    seqs  bigint[] NOT NULL,
    parts integer[] NOT NULL
);
-- (the batch's partitions, each once, for the other relays' check; a superset once part of
-- the batch is handed back or marked: it may keep a partition waiting a little longer)
ALTER TABLE {inflight} ADD COLUMN IF NOT EXISTS pset integer[];
"""

# The pending rows in seq order with their partition as a second key column, for the
# partitioned claim: its scan checks its partitions' span on each index entry and reads
# the heap rows of that span only. Made by the ``create_schema`` of a partitioned store
# (every append maintains one more index).
_PARTITION_INDEX = """\
CREATE INDEX IF NOT EXISTS "{name}_pseq" ON {table} (seq, part) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS "{name}_hseq" ON {table} (seq)
    WHERE sent_at IS NULL AND (parked OR available_at IS NOT NULL);
"""

#: the partitioned claim's backstop for its floor, in seconds (the store's
#: ``floor_rescan_seconds``): a relay's step ignores its floor and scans its partitions from
#: the bottom at its first step and then at least this often, so a row the floor passed
#: (which the floor's rules do not allow, but a server clock stepped back could) is claimed
#: within about this long after it commits
FLOOR_RESCAN_SECONDS = 30.0

#: partitions of the partitioned claim: a fixed number, part of the schema (the ``part``
#: column's expression); at most this many relays share the work
PARTITIONS = 64

# The partitioned claim and the relay's usual step, one statement (one round trip, one
# transaction, one PL/pgSQL call; a plain claim passes no rows to mark):
#  0. Mark the rows ``p_sent`` sent (delete them, or with p_keep set ``sent_at``) and take
#     them out of their in-flight batches.
#  1. Renew the relay's registration (``until`` = now + lease).
#  2. Fair share = ceil(PARTITIONS / live relays). A relay owning more releases the excess
#     (highest numbers first); one owning fewer takes free partitions (no owner, or an
#     owner no longer live). Ownership changes only under an exclusive advisory lock, which
#     waits for every claim in flight; every other claim holds that lock shared, so during
#     a claim the owners it reads cannot change.
#  3. Scan the pending rows of the partitions it owns, in seq order, skipping partitions in
#     which another live relay still holds rows in flight (a partition just handed over
#     waits until its previous owner has marked or released what it holds, or that
#     relay's registration runs out), the relay's own rows in flight, and keys held up by
#     an earlier parked or backing-off row. No row locks: one owner per partition.
#  4. In the same statement, record the rows as one in-flight batch (rows and partitions),
#     leased for p_lease, and return them: the scan's rows are kept once (a CTE), not
#     gathered into arrays and not read again.
_PCLAIM_FUNCTION = """\
CREATE OR REPLACE FUNCTION {fn}(p_owner text, p_sent bigint[], p_keep boolean,
                                p_limit integer, p_lease double precision, p_sync boolean,
                                p_floor boolean)
RETURNS SETOF {table}
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $msdata$
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_floor bigint;
    v_floor0 bigint;
    v_cand  bigint;
    v_cand_at timestamptz;
    v_x     bigint := 0;
    v_pin   bigint;
    v_busy  boolean;
    v_taken integer;
    v_ok    boolean;
    v_above boolean := true;
    v_held  bigint;
    v_top   bigint;
    v_until timestamptz := clock_timestamp() + make_interval(secs => p_lease);
    v_live  integer;
    v_fair  integer;
    v_have  integer;
    v_free  integer;
    v_mine  integer[];
    v_lo    integer;
    v_hi    integer;
    v_all   boolean;
    v_first bigint;
    v_last  bigint;
    v_slot  bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'msdata: the outbox claim needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    IF NOT p_sync THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF cardinality(p_sent) > 0 THEN
        SELECT min(s), max(s) INTO v_first, v_last FROM unnest(p_sent) s;
        IF p_keep THEN
            UPDATE {table} SET sent_at = clock_timestamp()
            WHERE seq = ANY(p_sent) AND sent_at IS NULL;
        ELSIF v_last - v_first < 2 * cardinality(p_sent) THEN
            -- a dense batch (one relay's rows, the usual case): one walk of the key range
            -- instead of a descent per row; "seq + 0" keeps the list out of the index scan
            DELETE FROM {table} WHERE seq BETWEEN v_first AND v_last AND seq + 0 = ANY(p_sent);
        ELSE
            DELETE FROM {table} WHERE seq = ANY(p_sent);
        END IF;
        -- the batches holding these rows lose them (the usual mark is exactly one batch,
        -- which ends); one pass, each batch updated in place: one left with no rows stays
        -- as the relay's empty slot, which its next claim fills (a batch lists its rows in
        -- seq order: its first and last bound it, so the batch claimed ahead is passed over
        -- without comparing lists; the rows left are found with a hash of the marked ones,
        -- not a search of the list per row). Updates, not a delete and an insert: on a table
        -- no vacuum visits, every insert went to a new page at the end and every scan of
        -- the in-flight batches read all the pages left behind (hundreds after 20k rows).
        UPDATE {inflight} l SET (seqs, parts, pset) = (
            SELECT coalesce(array_agg(u.s ORDER BY u.i), '{{}}'),
                   coalesce(array_agg(u.k ORDER BY u.i), '{{}}'),
                   CASE WHEN count(*) = 0 THEN '{{}}'::integer[] ELSE l.pset END
            FROM unnest(l.seqs, l.parts) WITH ORDINALITY AS u(s, k, i)
            -- (exactly the batch: it just ends)
            WHERE l.seqs <> p_sent AND u.s NOT IN (SELECT m FROM unnest(p_sent) m))
        WHERE l.seqs[1] <= v_last AND l.seqs[cardinality(l.seqs)] >= v_first
          AND l.seqs && p_sent;
    END IF;
    -- (a relay whose registration had run out starts again from the bottom: what it held
    -- may have lapsed long ago, its in-flight batches purged)
    INSERT INTO {relays} AS r (owner, until) VALUES (p_owner, v_until)
        ON CONFLICT (owner) DO UPDATE SET until = EXCLUDED.until,
            floor = CASE WHEN r.until > v_now THEN r.floor ELSE 0 END
        RETURNING r.floor, r.cand, r.cand_at INTO v_floor, v_cand, v_cand_at;
    v_floor0 := v_floor;

    -- (one pass over the 64 rows against the live relays, not a lookup per partition)
    SELECT count(*) FILTER (WHERE p.owner = p_owner),
           count(*) FILTER (WHERE r.owner IS NULL),
           (SELECT count(*) FROM {relays} q WHERE q.until > v_now)
      INTO v_have, v_free, v_live
      FROM {parts} p LEFT JOIN {relays} r ON r.owner = p.owner AND r.until > v_now;
    v_fair := ceil({n}::numeric / greatest(v_live, 1));
    IF v_have > v_fair OR (v_have < v_fair AND v_free > 0) THEN
        PERFORM pg_advisory_xact_lock({cls}, 1);
        -- fresh snapshots from here: every claim and rebalance before the lock is seen
        SELECT count(*) INTO v_live FROM {relays} r WHERE r.until > v_now;
        v_fair := ceil({n}::numeric / greatest(v_live, 1));
        UPDATE {parts} SET owner = NULL WHERE part IN (
            SELECT p.part FROM {parts} p WHERE p.owner = p_owner
            ORDER BY p.part DESC LIMIT greatest(
                (SELECT count(*) FROM {parts} q WHERE q.owner = p_owner) - v_fair, 0));
        UPDATE {parts} SET owner = p_owner WHERE part IN (
            SELECT p.part FROM {parts} p
            WHERE p.owner IS NULL OR NOT EXISTS (
                SELECT 1 FROM {relays} r WHERE r.owner = p.owner AND r.until > v_now)
            ORDER BY p.part LIMIT greatest(
                v_fair - (SELECT count(*) FROM {parts} q WHERE q.owner = p_owner), 0));
        GET DIAGNOSTICS v_taken = ROW_COUNT;
        IF v_taken > 0 THEN
            v_floor := 0;  -- partitions taken over: their rows may lie anywhere
        END IF;
    ELSE
        PERFORM pg_advisory_xact_lock_shared({cls}, 1);
    END IF;

    -- (the partitions other live relays hold rows of, gathered once and hashed, not a
    -- search of every batch's list per partition)
    WITH busy AS MATERIALIZED (
        SELECT DISTINCT u.k FROM {inflight} h, unnest(coalesce(h.pset, h.parts)) AS u(k)
        WHERE h.owner <> p_owner AND h.until > v_now AND u.k IS NOT NULL
          AND EXISTS (SELECT 1 FROM {relays} r WHERE r.owner = h.owner AND r.until > v_now)
    )
    SELECT array_agg(p.part) FILTER (WHERE b.k IS NULL), min(p.part) FILTER (WHERE b.k IS NULL),
           max(p.part) FILTER (WHERE b.k IS NULL), count(b.k) > 0
      INTO v_mine, v_lo, v_hi, v_busy
      FROM {parts} p LEFT JOIN busy b ON b.k = p.part
      WHERE p.owner = p_owner;
    IF v_mine IS NULL THEN
        IF p_floor AND v_floor IS DISTINCT FROM v_floor0 THEN
            UPDATE {relays} SET floor = v_floor WHERE owner = p_owner;
        END IF;
        RETURN;
    END IF;
    -- its partitions are one range (the usual case): the range check alone selects them
    v_all := v_hi - v_lo + 1 = cardinality(v_mine);

    IF p_floor THEN
        -- The scan starts above the relay's floor: every row of its partitions at or below
        -- it is gone, or in flight with this relay. It stays below every held row of its
        -- partitions (parked or backing off: the rows of their keys wait behind them) and
        -- every batch of its own whose lease ran out (those rows are pending again).
        --
        -- The horizon: the highest seq when the relay's last candidate was taken, once every
        -- other transaction of this database (seen in pg_stat_activity, none hidden, and no
        -- prepared one; autovacuum adds no rows) started after that moment. A row at or
        -- below it was given its seq by a transaction that began before then, so it has
        -- committed (and is visible to the scan below) or never will: no row appears at or
        -- below the horizon later. (One statement for the three.)
        SELECT least(
                (SELECT min(b.seq) FROM {table} b
                 WHERE b.sent_at IS NULL AND (b.parked OR b.available_at IS NOT NULL)
                   -- ("+ 0": the partitions checked on _hseq's few rows; as an index
                   -- bound on _pseq, the planner walked every pending row, visiting
                   -- the heap for those of this relay's partitions, at every step)
                   AND b.part + 0 BETWEEN v_lo AND v_hi),
                (SELECT min(u.s) FROM {inflight} h, unnest(h.seqs) AS u(s)
                 WHERE h.owner = p_owner AND h.until <= v_now)),
            v_cand IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM pg_stat_get_activity(NULL) a
                WHERE a.datid = (SELECT d.oid FROM pg_database d
                                 WHERE d.datname = current_database())
                  AND a.pid <> pg_backend_pid()
                  AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
                  -- (a session it may not see has no state: it counts as one that began
                  -- too early)
                  AND (a.xact_start <= v_cand_at OR a.state IS NULL))
              AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts x
                              WHERE x.database = current_database()),
            (SELECT coalesce(max(t.seq), 0) FROM {table} t),
            -- (its own rows in flight are usually all at or below its floor: the scan then
            -- need not look them up)
            (SELECT max(u.s) FROM {inflight} h, unnest(h.seqs) AS u(s)
             WHERE h.owner = p_owner AND h.until > v_now)
          INTO v_pin, v_ok, v_top, v_held;
        IF v_pin <= v_floor THEN
            v_floor := v_pin - 1;
        END IF;
        v_above := coalesce(v_held > v_floor, false);
        IF v_ok THEN
            v_x := v_cand;
            v_cand := NULL;
        END IF;
        IF v_cand IS NULL THEN
            -- the seq first (read above), then the time: whoever holds a lower seq began
            -- before it
            v_cand := v_top;
            v_cand_at := clock_timestamp();
        END IF;
    ELSE
        v_floor := 0;
    END IF;

    SELECT h.id INTO v_slot FROM {inflight} h WHERE h.owner = p_owner AND h.seqs = '{{}}' LIMIT 1;

    RETURN QUERY
    WITH blocked AS MATERIALIZED (
        SELECT b.aggregateid, min(b.seq) AS from_seq FROM {table} b
        WHERE b.sent_at IS NULL AND b.aggregateid IS NOT NULL
          AND (b.parked OR b.available_at IS NOT NULL)
          AND (b.parked OR b.available_at > v_now)
        GROUP BY b.aggregateid
    ), mine AS MATERIALIZED (
        SELECT u.s FROM {inflight} h, unnest(h.seqs) AS u(s)
        WHERE h.owner = p_owner AND h.until > v_now
    ), got AS MATERIALIZED (
        SELECT o.* FROM {table} o
        WHERE o.sent_at IS NULL AND NOT o.parked
          AND (o.available_at IS NULL OR o.available_at <= v_now)
          -- (the held keys as filters on the index scan, which then stops at p_limit
          -- rows: a join with them was planned as a hash join over every pending row of
          -- its partitions above the floor, then a sort, at every step; a row of a held
          -- key looks up its key's earliest held row, on _held)
          AND (o.aggregateid IS NULL
               OR o.aggregateid NOT IN (SELECT blocked.aggregateid FROM blocked)
               OR o.seq < (SELECT min(b.seq) FROM {table} b
                           WHERE b.aggregateid = o.aggregateid AND b.sent_at IS NULL
                             AND (b.parked OR b.available_at IS NOT NULL)
                             AND (b.parked OR b.available_at > v_now)))
          AND (v_all OR o.part = ANY(v_mine))
          -- the span of its partitions (one range after a rebalance, which hands them out
          -- in order), checked on the entries of _pseq: the scan reads the heap rows of
          -- its own partitions only, not every other relay's
          AND o.part BETWEEN v_lo AND v_hi
          AND (NOT v_above OR o.seq NOT IN (SELECT mine.s FROM mine))
          AND o.seq > v_floor
        ORDER BY o.seq
        LIMIT p_limit
    ), rec AS (
        -- (in seq order, as the CTE keeps its rows; were it not, the mark's range check
        -- could miss a batch, which would then stay in flight until its lease runs out)
        SELECT array_agg(got.seq) AS seqs, array_agg(got.part) AS parts,
               array_agg(DISTINCT got.part) AS pset
        FROM got HAVING count(*) > 0
    ), slot AS (
        -- into an empty slot of the relay's (a new id: a later batch, as when inserted), or
        -- a new one (none, or another statement took it out meanwhile)
        UPDATE {inflight} h SET id = DEFAULT, until = v_until, seqs = rec.seqs,
            parts = rec.parts, pset = rec.pset
        FROM rec WHERE h.id = v_slot AND h.owner = p_owner AND h.seqs = '{{}}'
        RETURNING 1
    ), batch AS (
        INSERT INTO {inflight} (owner, until, seqs, parts, pset)
        SELECT p_owner, v_until, rec.seqs, rec.parts, rec.pset
        FROM rec WHERE NOT EXISTS (SELECT 1 FROM slot)
    ), moved AS (
        -- the new floor: the scan saw every claimable row of its partitions above the
        -- floor, up to its last row (or all of them, when it found fewer than p_limit);
        -- not past the horizon nor a held row, and not at all while a partition of its was
        -- skipped
        UPDATE {relays} SET cand = v_cand, cand_at = v_cand_at,
            floor = CASE WHEN v_busy THEN v_floor ELSE least(v_pin - 1, greatest(v_floor,
                least(v_x, (SELECT CASE WHEN count(*) >= p_limit THEN max(got.seq) END
                            FROM got)))) END
        WHERE owner = p_owner AND p_floor
    )
    SELECT * FROM got ORDER BY got.seq;
END
$msdata$;
-- (the step without the floor, as relays of an earlier version call it: their release does
-- not lower a floor, so they scan from the start)
CREATE OR REPLACE FUNCTION {fn}(p_owner text, p_sent bigint[], p_keep boolean,
                                p_limit integer, p_lease double precision, p_sync boolean)
RETURNS SETOF {table}
LANGUAGE sql VOLATILE
AS $msdata$ SELECT * FROM {fn}(p_owner, p_sent, p_keep, p_limit, p_lease, p_sync, false) $msdata$;
-- (a plain claim: the same function with no rows to mark)
CREATE OR REPLACE FUNCTION {claim}(p_owner text, p_limit integer, p_lease double precision,
                                   p_sync boolean)
RETURNS SETOF {table}
LANGUAGE sql VOLATILE
AS $msdata$ SELECT * FROM {fn}(p_owner, '{{}}'::bigint[], false, p_limit, p_lease, p_sync, false)
$msdata$;
"""

# A relay stopping cleanly: its partitions are free at once (under the rebalance lock),
# its registration ends; rows it still holds in flight keep their partitions until marked
# or released.
_LEAVE = (
    "SELECT pg_advisory_xact_lock({cls}, 1)",
    "UPDATE {parts} SET owner = NULL WHERE owner = $1",
    "DELETE FROM {relays} WHERE owner = $1",
)

# The claim runs as one statement (one round trip): a PL/pgSQL function whose statements
# each take a fresh snapshot at READ COMMITTED.
#  1. Scan the available rows in seq order, skipping keys held up by an earlier parked or
#     backing-off row, keys under another relay's live lease and rows under any live
#     lease (a relay gets the later rows of the keys it holds: ``prefetch_claims``), and
#     take a transaction-scoped advisory lock on each row's key (on the row itself when it
#     has none) as it goes: a row whose lock another claim in flight holds is passed over,
#     so concurrent relays take different keys instead of waiting for each other. It keeps
#     the whole rows and the scan's snapshot.
#  2. With those locks held, a new snapshot sees every lease that an earlier claim of the
#     same keys committed. If no transaction ended between the two snapshots (they are
#     equal), the new one sees exactly what the scan saw, so the scan's rows stand: record
#     them as one lease and return them (one pass: the usual case with one relay).
#     Otherwise look again: keep the rows whose key (or row) is still free and which are
#     still pending, and record those as one lease.
_CLAIM_FUNCTION = """\
CREATE OR REPLACE FUNCTION {fn}(p_owner text, p_limit integer, p_lease double precision,
                                p_sync boolean)
RETURNS SETOF {table}
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $msdata$
DECLARE
    v_now  timestamptz := clock_timestamp();
    v_rows {table}[];
    v_snap pg_snapshot;
    v_seqs bigint[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'msdata: the outbox claim needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    IF NOT p_sync THEN
        -- losing a lease in a database crash only means the rows are published again
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;

    WITH held AS MATERIALIZED (
        SELECT b.aggregateid, min(b.seq) AS from_seq FROM {table} b
        WHERE b.sent_at IS NULL AND b.aggregateid IS NOT NULL
          AND (b.parked OR b.available_at IS NOT NULL)
          AND (b.parked OR b.available_at > v_now)
        GROUP BY b.aggregateid
    ), live AS MATERIALIZED (
        SELECT u.s, u.k, l.owner = p_owner AS mine
        FROM {lease} l, unnest(l.seqs, l.keys) AS u(s, k) WHERE l.until > v_now
    )
    SELECT array_agg(c.r ORDER BY c.seq), pg_current_snapshot() INTO v_rows, v_snap
      FROM (
        SELECT o AS r, o.seq FROM {table} o
        LEFT JOIN held ON held.aggregateid = o.aggregateid
        WHERE o.sent_at IS NULL AND NOT o.parked
          AND (o.available_at IS NULL OR o.available_at <= v_now)
          AND (held.from_seq IS NULL OR o.seq < held.from_seq)
          AND CASE WHEN o.aggregateid IS NULL
                   THEN o.seq NOT IN (SELECT live.s FROM live)
                        AND pg_try_advisory_xact_lock({null_class}, hashint8(o.seq))
                   ELSE o.aggregateid NOT IN (SELECT live.k FROM live
                                               WHERE live.k IS NOT NULL AND NOT live.mine)
                        AND o.seq NOT IN (SELECT live.s FROM live WHERE live.mine)
                        AND pg_try_advisory_xact_lock({lock_class}, hashtext(o.aggregateid))
              END
        ORDER BY o.seq
        LIMIT p_limit) c;

    IF v_rows IS NULL THEN
        RETURN;
    END IF;

    v_seqs := ARRAY(SELECT g.seq FROM unnest(v_rows) g);
    -- a new snapshot, taken with the locks held: equal to the scan's, nothing ended since;
    -- and no key starts after a pending row of its own that the scan passed over (a scan
    -- can fail a key's lock at its head row and get it at a later one, once the relay that
    -- held the lock committed without claiming that key: the head must come first)
    IF (SELECT pg_current_snapshot()::text) = v_snap::text AND NOT EXISTS (
        WITH firsts AS (
            SELECT g.aggregateid AS k, min(g.seq) AS first FROM unnest(v_rows) g
            WHERE g.aggregateid IS NOT NULL GROUP BY g.aggregateid
        ), mine AS (
            SELECT u.s FROM {lease} l, unnest(l.seqs) AS u(s)
            WHERE l.until > v_now AND l.owner = p_owner
        )
        SELECT 1 FROM {table} e JOIN firsts f ON e.aggregateid = f.k
        WHERE e.sent_at IS NULL AND e.seq < f.first
          AND e.seq < (SELECT max(firsts.first) FROM firsts)
          -- both ends of the range unknown at plan time: the planner takes its range
          -- default (0.5%) and walks _pending; one bound alone (1/3) can plan a Seq Scan
          AND e.seq >= (SELECT min(p.seq) FROM {table} p WHERE p.sent_at IS NULL)
          AND e.seq NOT IN (SELECT mine.s FROM mine)
    ) THEN
        INSERT INTO {lease} (owner, until, seqs, keys)
        SELECT p_owner, v_now + make_interval(secs => p_lease),
               array_agg(g.seq ORDER BY g.seq), array_agg(g.aggregateid ORDER BY g.seq)
        FROM unnest(v_rows) g;
        RETURN QUERY SELECT * FROM unnest(v_rows);
        RETURN;
    END IF;

    RAISE DEBUG 'msdata: outbox claim looks again';
    RETURN QUERY
    WITH live AS MATERIALIZED (
        SELECT u.s, u.k, l.owner = p_owner AS mine
        FROM {lease} l, unnest(l.seqs, l.keys) AS u(s, k) WHERE l.until > v_now
    ), kept AS MATERIALIZED (
        SELECT o.* FROM {table} o
        WHERE o.seq = ANY(v_seqs) AND o.sent_at IS NULL AND NOT o.parked
          AND (o.available_at IS NULL OR o.available_at <= v_now)
          AND CASE WHEN o.aggregateid IS NULL
                   THEN o.seq NOT IN (SELECT live.s FROM live)
                   ELSE o.aggregateid NOT IN (SELECT live.k FROM live
                                               WHERE live.k IS NOT NULL AND NOT live.mine)
                        AND o.seq NOT IN (SELECT live.s FROM live WHERE live.mine)
              END
    ), firsts AS MATERIALIZED (
        SELECT kept.aggregateid AS k, min(kept.seq) AS first FROM kept
        WHERE kept.aggregateid IS NOT NULL GROUP BY kept.aggregateid
    ), gapped AS MATERIALIZED (
        -- keys whose first kept row has an earlier pending row of the key that is neither
        -- kept nor leased to this relay: the key is not ours to publish yet (one range
        -- scan of _pending, bounded as in the one-pass check)
        SELECT DISTINCT f.k FROM firsts f JOIN {table} e ON e.aggregateid = f.k
        WHERE e.sent_at IS NULL AND e.seq < f.first
          AND e.seq < (SELECT max(firsts.first) FROM firsts)
          AND e.seq >= (SELECT min(p.seq) FROM {table} p WHERE p.sent_at IS NULL)
          AND e.seq NOT IN (SELECT live.s FROM live WHERE live.mine)
    ), got AS MATERIALIZED (
        SELECT kept.* FROM kept
        WHERE kept.aggregateid IS NULL
           OR kept.aggregateid NOT IN (SELECT gapped.k FROM gapped)
    ), lease AS (
        INSERT INTO {lease} (owner, until, seqs, keys)
        SELECT p_owner, v_now + make_interval(secs => p_lease),
               array_agg(got.seq ORDER BY got.seq), array_agg(got.aggregateid ORDER BY got.seq)
        FROM got HAVING count(*) > 0
    )
    SELECT got.* FROM got ORDER BY got.seq;
END
$msdata$;
"""

# The relay's usual step as one call (one round trip, one transaction): mark the batch it
# published sent (delete it, or with p_keep keep it as sent), take those rows out of their
# leases, then claim the next batch exactly as the claim function does (it sees the mark).
_SENT_CLAIM_FUNCTION = """\
CREATE OR REPLACE FUNCTION {fn}(p_owner text, p_sent bigint[], p_keep boolean,
                                p_limit integer, p_lease double precision, p_sync boolean)
RETURNS SETOF {table}
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $msdata$
BEGIN
    IF NOT p_sync THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF p_keep THEN
        UPDATE {table} SET sent_at = clock_timestamp()
        WHERE seq = ANY(p_sent) AND sent_at IS NULL;
    ELSE
        DELETE FROM {table} WHERE seq = ANY(p_sent);
    END IF;
    DELETE FROM {lease} l WHERE l.seqs <@ p_sent;
    UPDATE {lease} l SET seqs = f.seqs, keys = f.keys
    FROM (SELECT l2.id, array_agg(u.s ORDER BY u.i) AS seqs, array_agg(u.k ORDER BY u.i) AS keys
          FROM {lease} l2, unnest(l2.seqs, l2.keys) WITH ORDINALITY AS u(s, k, i)
          WHERE l2.seqs && p_sent AND u.s <> ALL(p_sent)
          GROUP BY l2.id) f
    WHERE l.id = f.id;
    RETURN QUERY SELECT * FROM {claim}(p_owner, p_limit, p_lease, p_sync);
END
$msdata$;
"""

# Take rows ``{rows}`` out of the leases matching ``{which}``: a lease left with none ends.
_UNLEASE = """\
emptied AS (
    DELETE FROM {lease} l WHERE {which} AND l.seqs <@ {rows}
), shrunk AS (
    UPDATE {lease} l SET seqs = f.seqs, keys = f.keys
    FROM (SELECT l2.id, array_agg(u.s ORDER BY u.i) AS seqs, array_agg(u.k ORDER BY u.i) AS keys
          FROM {lease} l2, unnest(l2.seqs, l2.keys) WITH ORDINALITY AS u(s, k, i)
          WHERE {which2} AND l2.seqs && {rows} AND NOT (l2.seqs <@ {rows})
            AND u.s <> ALL({rows})
          GROUP BY l2.id) f
    WHERE l.id = f.id
)"""

# The rows of ``$2`` that relay ``$1`` holds: in a lease of its own that no later lease
# (another relay's, after this one expired) has taken over.
_OWNED = """\
WITH own AS (
    SELECT DISTINCT u.s AS seq FROM {lease} l, unnest(l.seqs) AS u(s)
    WHERE l.owner = $1 AND l.seqs && $2::bigint[] AND u.s = ANY($2::bigint[])
      AND NOT EXISTS (SELECT 1 FROM {lease} n WHERE n.id > l.id AND n.seqs @> ARRAY[u.s])
), """


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

# What the relay side reads of a row, in OutboxRecord's field order. A created_at that
# Python's datetime cannot hold (before year 1, after 9999, or infinity) reads as NULL
# instead of failing the whole fetch in the driver (the row is then parked, see
# ``_read_row``); the other columns always convert (text, bytea, jsonb as text).
_RECORD_COLUMNS = (
    "seq, id, topic, type, payload, aggregateid, headers, "
    "CASE WHEN created_at >= timestamptz '0001-01-01 00:00:00+00' "
    "AND created_at < timestamptz '10000-01-01 00:00:00+00' THEN created_at END, "
    "attempts, last_error"
)

_tuple_new = tuple.__new__


def _no_time(value: object) -> Any:
    raise UnreadableRow("created_at", "is out of range (before year 1, after 9999, or infinite)")


def _records(rows: list[Any]) -> list[OutboxRecord]:
    """Rows of ``_RECORD_COLUMNS`` as records: by position, one tuple each, headers decoded
    only when there are some. Raises :class:`UnreadableRow` when a row cannot be read;
    the caller then reads them one by one (``_read_row``)."""
    return [
        _tuple_new(
            OutboxRecord,
            (
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                _NO_HEADERS if r[6] == "{}" else read_headers(r[6]),
                r[7] or _no_time(r[7]),
                r[8],
                r[9],
            ),
        )
        for r in rows
    ]


def _batch(rows: list[Any]) -> list[OutboxRecord] | OutboxBatch:
    """Rows of ``_RECORD_COLUMNS`` as an :class:`OutboxBatch` when they all have one topic
    and read as ``_records`` reads them (headers a JSON object of strings, a ``created_at``
    in range): one pass building the transport messages, the records built only if the
    relay asks (``_records`` on the same rows). Otherwise ``_records(rows)``, which raises
    :class:`UnreadableRow` for a row it cannot read. A message's headers are a plain dict of
    its own (a transport checks one faster than the records' read-only view)."""
    if not rows:
        return []
    topic = rows[0][2]
    message, no_headers, headers_of = TransportMessage, _NO_HEADERS, read_header_dict
    try:
        messages = [
            _tuple_new(message, (mid, p, key, no_headers if h == "{}" else headers_of(h)))
            for _, mid, t, _y, p, key, h, at, _a, _e in rows
            if t == topic and at is not None
        ]
    except UnreadableRow:
        return _records(rows)
    if len(messages) != len(rows):
        return _records(rows)
    return OutboxBatch(list(map(_first, rows)), topic, messages, partial(_records, rows))


def _first(row: Any) -> int:
    return row[0]  # type: ignore[no-any-return]


def _read_row(r: Any) -> tuple[OutboxRecord, str | None]:
    """One row of ``_RECORD_COLUMNS`` as a record, and why it cannot be published (None
    when it can); what cannot be read shows as empty (headers none, the time
    ``UNREADABLE_TIME``)."""
    reasons: list[str] = []
    headers = _NO_HEADERS
    try:
        headers = read_headers(r[6])
    except UnreadableRow as e:
        reasons.append(e.reason)
    created = r[7]
    if created is None:
        reasons.append(
            "unreadable row: created_at is out of range (before year 1, after 9999, or infinite)"
        )
        created = UNREADABLE_TIME
    record = _tuple_new(
        OutboxRecord, (r[0], r[1], r[2], r[3], r[4], r[5], headers, created, r[8], r[9])
    )
    return record, ("; ".join(reasons) if reasons else None)


class PostgresOutboxStore:
    """The PostgreSQL :class:`msdata.outbox.store.OutboxStore`.

    The write side (``append``/``append_async``) runs one INSERT (all rows in one
    statement) on the caller's psycopg, asyncpg or SQLAlchemy connection, in the caller's
    open transaction. The relay side runs on the store's own asyncpg pool: ``pool_or_dsn``
    is an ``asyncpg.Pool`` (the caller's; never closed here) or a DSN, from which a pool of
    at most ``max_size`` connections is made on first use (and closed by ``close``).

    Tables: ``{schema}.{table_prefix}outbox`` (its columns id, aggregatetype, aggregateid,
    type, payload are those Debezium's outbox event router reads), the unlogged
    ``{table_prefix}outbox_lease`` and the claim function ``{table_prefix}outbox_claim``;
    see ``schema_sql()`` and docs/postgres.md. ``notify``: each append also issues
    ``pg_notify`` in the caller's transaction (delivered at commit) so a waiting relay wakes
    at once; without it relays poll.
    ``relay_synchronous_commit=False`` (default) lets the relay's own transactions (claim,
    mark, release, retry, park) commit without waiting for the WAL flush: a database crash
    can only undo some of them, which means a message is published again (at least once
    holds). ``requeue`` and the writes in the caller's transaction are never affected.
    ``floor_rescan_seconds`` (``partitioned=True`` only; default 30, >= 0, else
    :class:`~msdata.errors.ConfigurationError`): how often at most a relay's step ignores
    its floor and scans its partitions from the bottom (0: every step), measured on this
    process's monotonic clock; see docs/postgres.md.
    """

    #: a relay's claim returns later rows of the keys it holds (never the rows it holds):
    #: the relay may claim its next batch while it publishes this one. Leases, ``sent_at``
    #: and ``created_at`` use the database server's clock, the one every relay agrees on
    features = OutboxStoreFeatures(prefetch_claims=True, reads_clock=False)

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        notify: bool = True,
        relay_synchronous_commit: bool = False,
        max_size: int = 4,
        partitioned: bool = False,
        floor_rescan_seconds: float = FLOOR_RESCAN_SECONDS,
    ) -> None:
        self.table_prefix = check_table_prefix(table_prefix)
        self._db = db = PostgresDatabase(
            pool_or_dsn, schema=schema, max_size=max_size, kind="outbox store"
        )
        self._schema = db.schema
        self._notify = bool(notify)
        self._sync = bool(relay_synchronous_commit)
        name = f"{self.table_prefix}outbox"
        self._name = name
        self.table = db.qualified(name)
        self.lease_table = db.qualified(f"{name}_lease")
        #: the claim function, ``"schema"."{prefix}outbox_claim"``
        self.claim_function = db.qualified(f"{name}_claim")
        self._sent_fn = db.qualified(f"{name}_sent_claim")
        self._partitioned = bool(partitioned)
        rescan = float(floor_rescan_seconds)
        if not (math.isfinite(rescan) and rescan >= 0):
            raise ConfigurationError(f"floor_rescan_seconds must be >= 0, not {rescan!r}")
        self._rescan = rescan
        # relay id -> when (time.monotonic) its last step scanned from the bottom
        self._rescanned: dict[str, float] = {}
        self.parts_table = db.qualified(f"{name}_parts")
        self.relays_table = db.qualified(f"{name}_relays")
        self.inflight_table = db.qualified(f"{name}_inflight")
        self._pclaim_fn = db.qualified(f"{name}_pclaim")
        self._psent_fn = db.qualified(f"{name}_psent_claim")
        if self._partitioned:
            self.features = OutboxStoreFeatures(
                prefetch_claims=True, reads_clock=False, partitioned=True
            )
        self._lock_class = db.lock_class(name)
        self._null_class = db.lock_class(f"{name}.rows")
        self._listener = Listener(db, name, what="outbox", log=log, wake_on_listen=True)
        #: the LISTEN/NOTIFY channel (at most 63 bytes, as PostgreSQL truncates identifiers)
        self.channel = self._listener.channel
        self._build_sql()
        self._wake = self._listener.wake

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresOutboxStore:
        """A store over ``postgresql://…`` that connects on first use; ``options`` go to
        the constructor (``table_prefix``, ``schema``, ``notify``, ``partitioned``,
        ``floor_rescan_seconds``, ``relay_synchronous_commit``, ``max_size``)."""
        check_store_options(cls, options, f"{cls.__name__} (postgresql://)")
        return cls(url, **options)

    def _build_sql(self) -> None:
        t = self.table
        one = (
            f"INSERT INTO {t} ({_COLUMNS}) VALUES "
            "({0}, {1}, {2}, {3}, {4}, {5}, CAST({6} AS jsonb))"
        )
        many = (
            f"INSERT INTO {t} ({_COLUMNS}) "
            "SELECT u.i, u.t, u.a, u.k, u.y, u.p, CAST(u.h AS jsonb) "
            "FROM unnest(CAST({0} AS text[]), CAST({1} AS text[]), CAST({2} AS text[]), "
            "CAST({3} AS text[]), CAST({4} AS text[]), CAST({5} AS bytea[]), "
            "CAST({6} AS text[])) WITH ORDINALITY AS u(i, t, a, k, y, p, h, n) ORDER BY u.n"
        )
        if self._notify:
            # one statement, one round trip: the notification is sent when the caller commits
            wrap = "WITH ins AS ({}) SELECT pg_notify('" + self.channel + "', '')"
            one, many = wrap.format(one), wrap.format(many)
        # in_transaction: refuse a connection on which the rows would commit on their own
        self._append_one = CallerSQL(one, "outbox append", in_transaction=True)
        self._append_many = CallerSQL(many, "outbox append", in_transaction=True)

        quiet = (
            ""
            if self._sync
            else " AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'"
        )
        lease = self.lease_table
        unlease_any = _UNLEASE.format(lease=lease, which="true", which2="true", rows="$1::bigint[]")
        unlease_mine = _UNLEASE.format(
            lease=lease, which="l.owner = $1", which2="l2.owner = $1", rows="$2::bigint[]"
        )
        claim, sent_fn = f"{self.claim_function}($1, $2, $3, $4)", self._sent_fn
        sent_args = "$1, $2::bigint[], $3, $4, $5, $6"
        lowered = ""
        if self._partitioned:
            # the same statements over the in-flight batches, which list partitions
            lease = self.inflight_table
            unlease_any = _UNLEASE.format(
                lease=lease, which="true", which2="true", rows="$1::bigint[]"
            ).replace("keys", "parts")
            unlease_mine = _UNLEASE.format(
                lease=lease, which="l.owner = $1", which2="l2.owner = $1", rows="$2::bigint[]"
            ).replace("keys", "parts")
            # one function for both: a plain claim marks no rows (one PL/pgSQL call)
            # (p_floor: the scan starts above the relay's floor; false: from the bottom, a
            # rescan, see ``_floor``)
            claim = f"{self._psent_fn}($1, '{{}}'::bigint[], false, $2, $3, $4, $5)"
            sent_fn, sent_args = self._psent_fn, sent_args + ", $7"
            # rows a relay hands back, backs off or parks are pending again (or held) below
            # its floor, perhaps: the floor goes below them
            lowered = (
                f", lowered AS (UPDATE {self.relays_table} SET floor = least(floor, "
                "(SELECT min(own.seq) FROM own) - 1) WHERE owner = $1 "
                "AND EXISTS (SELECT 1 FROM own))"
            )
        owned = _OWNED.format(lease=lease) + unlease_mine + lowered
        self._sql = {
            "claim": f"SELECT {_RECORD_COLUMNS} FROM {claim}",
            "sent_claim": f"SELECT {_RECORD_COLUMNS} FROM {sent_fn}({sent_args})",
            **{
                f"leave{i}": q.format(
                    cls=self._lock_class, parts=self.parts_table, relays=self.relays_table
                )
                for i, q in enumerate(_LEAVE)
            },
            "delete": f"WITH gone AS (DELETE FROM {t} WHERE seq = ANY($1::bigint[]){quiet} "
            f"RETURNING 1), {unlease_any} SELECT count(*) FROM gone",
            "keep": f"WITH gone AS (UPDATE {t} SET sent_at = clock_timestamp() "
            f"WHERE seq = ANY($1::bigint[]) AND sent_at IS NULL{quiet} RETURNING 1), "
            f"{unlease_any} SELECT count(*) FROM gone",
            "release": owned + " SELECT count(*) FROM own",
            "retry": owned + f" UPDATE {t} o SET attempts = o.attempts + 1, last_error = $3, "
            "available_at = $4 FROM own "
            f"WHERE o.seq = own.seq AND o.sent_at IS NULL AND NOT o.parked{quiet}",
            "park": owned + f" UPDATE {t} o SET parked = true, last_error = $3 FROM own "
            f"WHERE o.seq = own.seq AND o.sent_at IS NULL AND NOT o.parked{quiet}",
            "parked": f"SELECT {_RECORD_COLUMNS} FROM {t} WHERE parked AND sent_at IS NULL "
            "ORDER BY seq LIMIT $1",
            "requeue": f"UPDATE {t} SET parked = false, attempts = 0, available_at = NULL "
            "WHERE seq = ANY($1::bigint[]) AND parked AND sent_at IS NULL",
            "status": "SELECT count(*) FILTER (WHERE NOT parked) AS pending, "
            # (a row another writer gave an infinite created_at is not counted in the age)
            "extract(epoch FROM clock_timestamp() - min(created_at) "
            "FILTER (WHERE NOT parked AND isfinite(created_at)))"
            "::float8 AS age, count(*) FILTER (WHERE parked) AS parked "
            f"FROM {t} WHERE sent_at IS NULL",
            # and leases that ran out long ago (their relay died)
            "purge": f"WITH stale AS (DELETE FROM {lease} l "
            "WHERE l.until < clock_timestamp() - interval '1 hour') "
            f"DELETE FROM {t} WHERE sent_at IS NOT NULL AND sent_at < $1",
        }

    # -- schema ----------------------------------------------------------------------------

    def schema_sql(self) -> str:
        """The DDL ``create_schema`` runs (idempotent), e.g. for a migration tool."""
        parts = [self._db.schema_head()] if self._schema else []
        parts.append(_TABLE.format(table=self.table, name=self._name, lease=self.lease_table))
        parts.append(
            _CLAIM_FUNCTION.format(
                table=self.table,
                lease=self.lease_table,
                fn=self.claim_function,
                lock_class=self._lock_class,
                null_class=self._null_class,
            )
        )
        parts.append(
            _SENT_CLAIM_FUNCTION.format(
                table=self.table,
                lease=self.lease_table,
                fn=self._sent_fn,
                claim=self.claim_function,
            )
        )
        names = {
            "table": self.table,
            "n": PARTITIONS,
            "parts": self.parts_table,
            "relays": self.relays_table,
            "inflight": self.inflight_table,
            "cls": self._lock_class,
        }
        parts.append(_PARTITION_TABLES.format(**names))
        if self._partitioned:
            parts.append(_PARTITION_INDEX.format(name=self._name, table=self.table))
        parts.append(_PCLAIM_FUNCTION.format(fn=self._psent_fn, claim=self._pclaim_fn, **names))
        return "\n".join(parts)

    async def create_schema(self) -> None:
        await self._db.run_ddl("outbox create_schema", self.schema_sql(), self._lock_class)

    async def drop_schema(self) -> None:
        """Drop the table and the claim function (for tests and teardown)."""
        sql = (
            f"DROP TABLE IF EXISTS {self.table}, {self.lease_table}, {self.parts_table}, "
            f"{self.relays_table}, {self.inflight_table} CASCADE"
        )
        await self._db.call("outbox drop_schema", lambda pool: pool.execute(sql))

    # -- write side: the caller's connection and transaction --------------------------------

    def _args(self, rows: Sequence[OutboxRow]) -> tuple[CallerSQL, list[Any]]:
        if len(rows) == 1:
            r = rows[0]
            return self._append_one, [
                r.message_id,
                r.topic,
                r.aggregate_type,
                r.partition_key,
                r.type,
                bytes(r.payload),
                json.dumps(dict(r.headers)) if r.headers else "{}",
            ]
        return self._append_many, [
            [r.message_id for r in rows],
            [r.topic for r in rows],
            [r.aggregate_type for r in rows],
            [r.partition_key for r in rows],
            [r.type for r in rows],
            [bytes(r.payload) for r in rows],
            [json.dumps(dict(r.headers)) if r.headers else "{}" for r in rows],
        ]

    def append(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """Insert ``rows`` on a psycopg ``Connection`` or SQLAlchemy ``Session``/
        ``Connection``, in its open transaction (one statement for all rows)."""
        if rows:
            sql, args = self._args(rows)
            sql.run(conn, args)

    async def append_async(self, conn: Connection, rows: Sequence[OutboxRow]) -> None:
        """Insert ``rows`` on an asyncpg connection, a psycopg ``AsyncConnection`` or a
        SQLAlchemy ``AsyncSession``/``AsyncConnection``, in its open transaction."""
        if rows:
            sql, args = self._args(rows)
            await sql.run_async(conn, args)

    # -- relay side: the store's own pool, one committed statement each ---------------------

    async def claim(self, relay_id: str, limit: int, lease_seconds: float) -> list[OutboxRecord]:
        claimed = await self._claim(relay_id, limit, lease_seconds, _records)
        assert type(claimed) is list  # (records, as asked)
        return claimed

    async def _claim(
        self,
        relay_id: str,
        limit: int,
        lease_seconds: float,
        read: Callable[[list[Any]], list[OutboxRecord] | OutboxBatch],
    ) -> list[OutboxRecord] | OutboxBatch:
        if limit <= 0:
            return []
        if lease_seconds <= 0:
            raise ConfigurationError("lease_seconds must be > 0")
        sql = self._sql["claim"]
        args = (relay_id, int(limit), float(lease_seconds), self._sync, *self._floor(relay_id))
        while True:
            rows = await self._db.call("outbox claim", lambda pool: pool.fetch(sql, *args))
            try:
                return read(rows)
            except UnreadableRow:
                records, parked = await self._read_slowly(relay_id, rows)
            if records or not parked:
                return records
            # only unreadable rows (now parked) and rows behind them: look again past them,
            # so that a claim returns nothing only when nothing is claimable

    async def mark_sent_and_claim(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        *,
        keep: bool = False,
    ) -> list[OutboxRecord]:
        """``mark_sent`` then ``claim`` as one statement (one round trip, one transaction):
        ``SELECT * FROM {prefix}outbox_sent_claim(...)``."""
        claimed = await self._mark_and_claim(
            relay_id, sent_seqs, limit, lease_seconds, keep, _records
        )
        assert type(claimed) is list  # (records, as asked)
        return claimed

    async def claim_messages(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        *,
        keep: bool = False,
    ) -> list[OutboxRecord] | OutboxBatch:
        """``mark_sent_and_claim`` (``claim`` when ``sent_seqs`` is empty) returning the
        claimed rows as an :class:`msdata.outbox.store.OutboxBatch` where they all have one
        topic and read as the store writes them, else as records (see
        :class:`msdata.outbox.store.OutboxRelayStore`); the relay's fast path."""
        return await self._mark_and_claim(relay_id, sent_seqs, limit, lease_seconds, keep, _batch)

    async def _mark_and_claim(
        self,
        relay_id: str,
        sent_seqs: Sequence[int],
        limit: int,
        lease_seconds: float,
        keep: bool,
        read: Callable[[list[Any]], list[OutboxRecord] | OutboxBatch],
    ) -> list[OutboxRecord] | OutboxBatch:
        if not sent_seqs:
            return await self._claim(relay_id, limit, lease_seconds, read)
        if limit <= 0:
            await self.mark_sent(relay_id, sent_seqs, keep=keep)
            return []
        if lease_seconds <= 0:
            raise ConfigurationError("lease_seconds must be > 0")
        sql = self._sql["sent_claim"]
        args = (
            relay_id,
            list(sent_seqs),
            bool(keep),
            int(limit),
            float(lease_seconds),
            self._sync,
            *self._floor(relay_id),
        )
        rows = await self._db.call("outbox mark_sent_and_claim", lambda p: p.fetch(sql, *args))
        try:
            return read(rows)
        except UnreadableRow:
            records, parked = await self._read_slowly(relay_id, rows)
        if records or not parked:
            return records
        return await self._claim(relay_id, limit, lease_seconds, read)  # look again past them

    def _floor(self, relay_id: str) -> tuple[bool, ...]:
        """The partitioned step's ``p_floor`` argument (nothing for the per-key claim):
        false, a scan from the bottom that ignores the relay's floor, at the relay's first
        step and then once every ``floor_rescan_seconds`` on this process's monotonic clock
        (no wall clock moves it, the server's or this host's); true otherwise."""
        if not self._partitioned:
            return ()
        now = time.monotonic()
        last = self._rescanned.get(relay_id)
        if last is not None and now - last < self._rescan:
            return (True,)
        self._rescanned[relay_id] = now
        return (False,)

    async def _read_slowly(self, relay_id: str, rows: list[Any]) -> tuple[list[OutboxRecord], int]:
        """A claimed batch holding a row that cannot be read, row by row: park each such
        row with its reason, hand back the later rows of its key (they wait behind it, as
        behind any parked row); return the others, and how many rows were parked."""
        good: list[OutboxRecord] = []
        bad: dict[str, list[int]] = {}
        behind: list[int] = []
        stuck: set[str] = set()
        for r in rows:
            key = r[5]
            if key is not None and key in stuck:
                behind.append(r[0])
                continue
            record, reason = _read_row(r)
            if reason is None:
                good.append(record)
                continue
            bad.setdefault(safe_text(reason, 2000), []).append(r[0])
            if key is not None:
                stuck.add(key)
        parked = 0
        for reason, seqs in bad.items():
            # parked as the relay parks a row: only while this relay holds it
            parked += await self._update("park", "park", relay_id, seqs, reason)
            log.error("outbox rows %s parked: %s", seqs, reason)
        if behind:
            await self.release(relay_id, behind)
        return good, parked

    async def _update(self, what: str, key: str, *args: Any) -> int:
        sql = self._sql[key]
        status = await self._db.call(f"outbox {what}", lambda pool: pool.execute(sql, *args))
        return command_count(status)

    async def leave(self, relay_id: str) -> None:
        """A relay stops: with ``partitioned=True`` its partitions are free at once for the
        other relays (rows it still holds stay its own until marked or released). The
        relay calls this last when it stops; without partitions it does nothing."""
        if self._partitioned:
            lock, free, gone = (self._sql[f"leave{i}"] for i in range(3))

            async def run(pool: Any) -> None:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(lock)
                    await conn.execute(free, relay_id)
                    await conn.execute(gone, relay_id)

            await self._db.call("outbox leave", run)

    async def mark_sent(self, relay_id: str, seqs: Sequence[int], *, keep: bool = False) -> None:
        if seqs:
            await self._update("mark_sent", "keep" if keep else "delete", list(seqs))

    async def release(self, relay_id: str, seqs: Sequence[int]) -> None:
        if seqs:
            await self._update("release", "release", relay_id, list(seqs))
            self._wake.set()

    async def retry_later(
        self, relay_id: str, seqs: Sequence[int], reason: str, retry_at: datetime
    ) -> None:
        if seqs:
            await self._update("retry_later", "retry", relay_id, list(seqs), reason, retry_at)

    async def park(self, relay_id: str, seqs: Sequence[int], reason: str) -> None:
        if seqs:
            await self._update("park", "park", relay_id, list(seqs), reason)

    async def parked(self, limit: int = 100) -> list[OutboxRecord]:
        sql = self._sql["parked"]
        rows = await self._db.call("outbox parked", lambda pool: pool.fetch(sql, int(limit)))
        # row by row: a parked row may be one that cannot be read (shown as far as it can)
        return [_read_row(r)[0] for r in rows]

    async def requeue(self, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        n = await self._update("requeue", "requeue", list(seqs))
        if n:
            self._wake.set()
        return n

    async def check_schema(self) -> None:
        """Raise :class:`~msdata.errors.SchemaError` when a table of this store is missing
        (what a relay checks at start): one statement that reads no row, whatever the
        backlog (``status()`` counts every pending row)."""
        tables = [self.table, self.lease_table]
        if self._partitioned:
            tables.append(self.parts_table)
        sql = "SELECT " + ", ".join(f"(SELECT 1 FROM {t} LIMIT 0)" for t in tables)
        await self._db.call("outbox schema check", lambda pool: pool.fetchrow(sql))

    async def status(self) -> OutboxStatus:
        sql = self._sql["status"]
        row = await self._db.call("outbox status", lambda pool: pool.fetchrow(sql))
        age = row["age"]
        return OutboxStatus(
            pending=row["pending"],
            oldest_pending_age=None if age is None else max(0.0, float(age)),
            parked=row["parked"],
        )

    async def purge_sent(self, older_than: datetime) -> int:
        return await self._update("purge_sent", "purge", older_than)

    # -- wake-up ---------------------------------------------------------------------------

    async def wait_for_rows(self, timeout: float) -> None:
        """Return on a NOTIFY from a committed append, or after ``timeout`` seconds. Without
        a listening connection (``notify=False``, or it could not connect) this is a poll."""
        await self._db.pool()  # raises if closed
        if not (self._notify and await self._listener.listening()):
            await asyncio.sleep(timeout)
            return
        if not self._wake.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                return
        self._wake.clear()

    async def close(self) -> None:
        """Stop listening and close the pool the store made (a given pool stays open)."""
        await self._listener.stop()
        await self._db.close("outbox close")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
