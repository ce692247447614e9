"""The ``msdata`` command line, driven as a subprocess against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from pydantic import BaseModel

from msdata import Event, MessageRegistry
from msdata.messages import handling, make_envelope, message_type
from msdata.saga import Saga, SagaStatus
from msdata.service import Service
from msdata.testing import eventually
from msdata.urls import store_from_url

registry = MessageRegistry()


@message_type("cli.Tick", registry=registry)
class Tick(Event):
    n: int


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def msdata(
    *args: str, cwd: Path | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "msdata.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        cwd=cwd,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def fails(*args: str, cwd: Path | None = None) -> str:
    """The one line a failing command prints."""
    proc = msdata(*args, cwd=cwd, ok=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def usage(*args: str) -> str:
    """The usage error a badly called command prints (exit 2, as docs/cli.md says)."""
    proc = msdata(*args, ok=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    return proc.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("dlq", "list", "--limit", "0"), "--limit"),
        (("dlq", "list", "--limit", "-3"), "--limit"),
        (("dlq", "replay", "--limit", "0"), "--limit"),
        (("outbox", "parked", "--db", "sqlite:///x.db", "--limit", "-1"), "--limit"),
        (("sagas", "list", "--db", "sqlite:///x.db", "--limit", "0"), "--limit"),
        (
            (
                "relay",
                "run",
                "--db",
                "sqlite:///x.db",
                "--broker",
                "redis://localhost:1/0",
                "--batch-size",
                "0",
            ),
            "--batch-size",
        ),
        (("outbox", "requeue", "--db", "sqlite:///x.db", "0"), "SEQS"),
        (("outbox", "requeue", "--db", "sqlite:///x.db", "1", str(2**63)), "SEQS"),
        (("outbox", "requeue", "--db", "sqlite:///x.db", "1", "--all"), "not both"),
        (("dlq", "list", "--topic", "x.g1.dlq", "--group", "msdata-dlq"), "dead-letter"),
        (("dlq", "replay", "--topic", "x", "--group", "msdata-dlq"), "dead-letter"),
    ],
)
def test_a_count_below_1_or_a_contradiction_is_a_usage_error(
    args: tuple[str, ...], says: str
) -> None:
    """A limit or count of 0 or less is refused (it used to print "no dead letters", exit 0,
    while there were some); so are seqs with --all, and --group naming the group msdata reads
    dead-letter topics with (reading x.g1.dlq as group msdata-dlq created x.g1.dlq.msdata-dlq.dlq
    streams)."""
    if args[0] == "dlq":
        args = (*args[:2], "--broker", "redis://localhost:1/0", *args[2:])
    assert says in usage(*args)


def test_usage_errors_exit_2() -> None:
    assert "--group" in usage("dlq", "list", "--broker", "redis://localhost:1/0", "--topic", "t")
    assert "--broker" in usage("dlq", "list", "--topic", "t", "--group", "g")
    assert "No such option" in usage("db", "init", "sqlite:///x.db", "--json")


def test_a_schema_on_a_sqlite_database_is_a_usage_error(tmp_path: Path) -> None:
    """``--schema`` names a PostgreSQL schema: on SQLite it is a usage error naming the
    option, not ``error: TypeError: ...`` from the store."""
    error = usage("db", "init", f"sqlite:///{tmp_path}/orders.db", "--schema", "foo")
    assert "--schema" in error and "TypeError" not in error
    assert not (tmp_path / "orders.db").exists()


class Db(NamedTuple):
    url: str
    options: list[str]  # --schema for PostgreSQL
    schema: str | None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        yield Db(f"sqlite:///{tmp_path}/cli.db", [], None)
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"cli_{uuid.uuid4().hex[:8]}"
    yield Db(url, ["--schema", schema], schema)

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


async def add_ticks(db: Db, n: int) -> None:
    service = Service("cli", db=db.url, schema=db.schema, registry=registry, relay=False)
    async with service, service.transaction():
        for i in range(n):
            await service.publish(Tick(n=i), key=f"k{i % 3}")


async def park_all(db: Db) -> None:
    options: dict[str, Any] = {"schema": db.schema} if db.schema else {}
    store = store_from_url("outbox", db.url, **options)
    try:
        rows = await store.claim("cli-test", 100, 30.0)
        await store.park("cli-test", [r.seq for r in rows], "broker said no")
    finally:
        await store.close()


def test_db_init_outbox_status_parked_and_requeue(db: Db) -> None:
    out = msdata("db", "init", db.url, *db.options, "--sql").stdout
    assert "CREATE TABLE IF NOT EXISTS" in out and "outbox" in out
    line = fails("outbox", "status", "--db", db.url, *db.options)
    assert "msdata db init" in line  # no file (SQLite) or no tables (PostgreSQL)
    msdata("db", "init", db.url, *db.options)
    msdata("db", "init", db.url, *db.options)  # idempotent

    asyncio.run(add_ticks(db, 5))
    status = json.loads(msdata("outbox", "status", "--db", db.url, *db.options, "--json").stdout)
    assert status["pending"] == 5 and status["parked"] == 0
    assert "pending" in msdata("outbox", "status", "--db", db.url, *db.options).stdout

    asyncio.run(park_all(db))
    parked = json.loads(msdata("outbox", "parked", "--db", db.url, *db.options, "--json").stdout)
    assert len(parked) == 5 and {p["last_error"] for p in parked} == {"broker said no"}
    assert "broker said no" in msdata("outbox", "parked", "--db", db.url, *db.options).stdout
    first, second = str(parked[0]["seq"]), str(parked[1]["seq"])
    one = msdata("outbox", "requeue", "--db", db.url, *db.options, first, "--json").stdout
    assert json.loads(one) == {"requeued": 1, "not_parked": []}
    # a seq that is not parked (requeued already, or no such row): the others are requeued,
    # the command says which were not and exits 1
    some = ("outbox", "requeue", "--db", db.url, *db.options, second, first, "99999")
    proc = msdata(*some, "--json", ok=False)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout) == {"requeued": 1, "not_parked": [int(first), 99999]}
    assert proc.stderr.strip().endswith(f"sent): {first}, 99999"), proc.stderr
    line = fails("outbox", "requeue", "--db", db.url, *db.options, "99999")
    assert "not requeued" in line and "99999" in line
    rest = msdata("outbox", "requeue", "--db", db.url, *db.options, "--all", "--json").stdout
    assert json.loads(rest) == {"requeued": 3, "not_parked": []}
    status = json.loads(msdata("outbox", "status", "--db", db.url, *db.options, "--json").stdout)
    assert status == {"pending": 5, "oldest_pending_age": status["oldest_pending_age"], "parked": 0}
    assert "name the rows" in usage("outbox", "requeue", "--db", db.url, *db.options)


@pytest.mark.redis
def test_relay_run_publishes_and_stops_on_sigterm(db: Db, redis_url: str) -> None:
    msdata("db", "init", db.url, *db.options)
    asyncio.run(add_ticks(db, 30))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "msdata.cli",
            "relay",
            "run",
            "--db",
            db.url,
            *db.options,
            "--broker",
            redis_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:

        def drained() -> bool:
            out = msdata("outbox", "status", "--db", db.url, *db.options, "--json").stdout
            return json.loads(out)["pending"] == 0

        asyncio.run(eventually(drained, timeout=30, what="the relay process drained the outbox"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.strip().endswith("stopped")


def test_one_line_errors_without_credentials(tmp_path: Path) -> None:
    assert "no database file" in fails("outbox", "status", "--db", f"sqlite:///{tmp_path}/no.db")
    assert not (tmp_path / "no.db").exists()  # reading never creates a database
    line = fails("outbox", "status", "--db", "mysql://admin:hunter2@db.example/x")
    assert "not a database URL" in line and "hunter2" not in line
    line = fails("outbox", "status", "--db", "postgresql://admin:hunter2@127.0.0.1:1/x")
    assert "cannot connect" in line and "hunter2" not in line
    line = fails(
        "relay",
        "run",
        "--db",
        "postgresql://admin:hunter2@127.0.0.1:1/x",
        "--broker",
        "redis://:pw@127.0.0.1:1",
    )
    assert "hunter2" not in line and "pw@" not in line
    line = fails("relay", "run", "--db", "memory://", "--broker", "memory://")
    assert "memory:// keeps nothing between processes" in line
    # a broker on a closed port: the driver's own ERROR line is not printed beside ours
    where = ["--topic", "t", "--group", "g"]
    line = fails("dlq", "list", "--broker", "amqp://guest:hunter2@127.0.0.1:1/", *where)
    assert "could not connect to RabbitMQ at amqp://127.0.0.1:1/" in line, line
    assert "hunter2" not in line
    line = fails("dlq", "list", "--broker", "redis://:hunter2@127.0.0.1:1/0", *where)
    assert "could not connect to Redis at redis://127.0.0.1:1/0" in line, line
    assert "hunter2" not in line
    assert "module:attr" in fails("projections", "status", "--app", "nocolon")
    assert "cannot import" in fails("projections", "status", "--app", "no_such_module:service")


@pytest.mark.redis
def test_dlq_list_of_a_mistyped_topic_fails_and_creates_nothing(redis_url: str) -> None:
    import redis

    topic = f"cli-typo-{uuid.uuid4().hex[:8]}"
    where = ["--broker", redis_url, "--topic", topic, "--group", "billing"]
    for command in (["list"], ["show", "some-id"]):
        line = fails("dlq", *command, *where)
        assert "no such dead-letter topic" in line and f"{topic}.billing.dlq" in line
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"*{topic}*")) == []  # nothing was created
    finally:
        client.close()


@pytest.mark.redis
def test_dlq_list_reads_dead_letters_another_reader_read_first(redis_url: str) -> None:
    """``msdata dlq list`` creates its reader group after the dead letters arrived and after
    another group (a service's own audit) read them: it still lists them."""
    from msdata.transport import TransportMessage, dead_letter_topic
    from msdata.urls import transport_from_url

    topic, group = f"cli-{uuid.uuid4().hex[:8]}", "billing"

    async def dead_letter_and_read() -> None:
        transport = transport_from_url(redis_url)
        try:
            await transport.declare_group(topic, group)
            await transport.declare_group(dead_letter_topic(topic, group), "audit")
            async with transport.subscribe(topic, group) as sub:
                await transport.publish(topic, [TransportMessage(id="m-1", body=b"{}")])
                got = await sub.receive(1, timeout=10.0)
                assert len(got) == 1
                await got[0].dead_letter("RejectMessage: late reader")
        finally:
            await transport.close()

    asyncio.run(dead_letter_and_read())
    where = ["--broker", redis_url, "--topic", topic, "--group", group]
    listed = json.loads(msdata("dlq", "list", *where, "--json").stdout)
    assert [d["id"] for d in listed] == ["m-1"]


@pytest.mark.redis
def test_dlq_list_leaves_a_dead_letter_over_its_size_limit_where_it_is(redis_url: str) -> None:
    """A service with a larger ``max_message_bytes`` dead-letters a 2 MB message: ``msdata
    dlq list`` (the default limit, 1 MiB and a bit) lists it with the small one, twice;
    ``show`` gives it whole; ``replay`` fails naming it (too large to publish) and it is
    listed again. The old Redis reader dead-lettered it into ``<dlq>.msdata-dlq.dlq``."""
    from msdata.transport import TransportMessage
    from msdata.urls import transport_from_url

    topic, group = f"cli-{uuid.uuid4().hex[:8]}", "billing"

    async def dead_letter_two() -> None:
        transport = transport_from_url(redis_url, max_message_bytes=3_000_000)
        try:
            await transport.declare_group(topic, group)
            async with transport.subscribe(topic, group) as sub:
                await transport.publish(
                    topic,
                    [
                        TransportMessage(id="small", body=b"{}"),
                        TransportMessage(id="big", body=b"x" * 2_000_000),
                    ],
                )
                got: list[Any] = []
                while len(got) < 2:
                    got += await sub.receive(2, timeout=10.0)
                for d in got:
                    await d.dead_letter("RejectMessage: no")
        finally:
            await transport.close()

    asyncio.run(dead_letter_two())
    where = ["--broker", redis_url, "--topic", topic, "--group", group]
    for _ in range(2):
        listed = json.loads(msdata("dlq", "list", *where, "--json").stdout)
        assert sorted(d["id"] for d in listed) == ["big", "small"]
    shown = json.loads(msdata("dlq", "show", *where, "big", "--json").stdout)
    assert shown["body"] == "x" * 2_000_000
    proc = msdata("dlq", "replay", *where, ok=False)
    assert proc.returncode == 1 and "MessageTooLarge: message big" in proc.stderr, proc.stderr
    listed = json.loads(msdata("dlq", "list", *where, "--json").stdout)
    assert [d["id"] for d in listed] == ["big"]


def test_dlq_prints_a_foreign_message_without_its_terminal_escapes(redis_url: str) -> None:
    """A foreign message whose id and body hold terminal escapes (colour, window title,
    clear screen) is listed and shown with them escaped; ``--json`` gives a body that is not
    UTF-8 as base64; the dead-letter log line escapes the id too."""
    from msdata.transport import TransportMessage
    from msdata.urls import transport_from_url

    topic, group = f"cli-{uuid.uuid4().hex[:8]}", "billing"
    message_id = "esc\x1b[31mRED\x1b[0m"
    body = b"\x1b]0;pwned\x07\x1b[2J \xff body"

    async def dead_letter() -> None:
        transport = transport_from_url(redis_url)
        try:
            await transport.declare_group(topic, group)
            async with transport.subscribe(topic, group) as sub:
                await transport.publish(topic, [TransportMessage(id=message_id, body=body)])
                got = await sub.receive(1, timeout=10.0)
                assert len(got) == 1
                await got[0].dead_letter("RejectMessage: \x1b[2Jbad")
        finally:
            await transport.close()

    asyncio.run(dead_letter())
    where = ["--broker", redis_url, "--topic", topic, "--group", group]
    for args in (("list",), ("show", message_id)):
        out = msdata("dlq", *args, *where).stdout
        assert "\x1b" not in out and "\x07" not in out, out
        assert "esc\\x1b[31mRED" in out
    shown = json.loads(msdata("dlq", "show", *where, message_id, "--json").stdout)
    assert shown["id"] == message_id and shown["body"].endswith("\ufffd body")
    assert base64.b64decode(shown["body_base64"]) == body


def test_dlq_show_lays_out_one_line_per_field_whatever_a_foreign_message_holds(
    redis_url: str,
) -> None:
    """A foreign message id and body holding line breaks, ESC and BEL cannot forge lines
    (``reason: ...``) in ``msdata dlq show``: each field's value is escaped before the
    fields are laid out, one line each."""
    from msdata.urls import transport_from_url

    topic, group = f"cli-{uuid.uuid4().hex[:8]}", "billing"
    message_id = "id\r\nreason: forged\x1b[2J\x07"
    body = b"body\r\nreason: forged too\x1b]0;t\x07 " + b"x" * 300

    async def dead_letter() -> None:
        transport = transport_from_url(redis_url)
        try:
            await transport.declare_group(topic, group)
            async with transport.subscribe(topic, group) as sub:
                # a foreign producer, which no check of msdata's stops
                await transport._client.xadd(  # type: ignore[attr-defined]
                    transport._stream_key(topic),  # type: ignore[attr-defined]
                    {"id": message_id, "body": body},
                )
                got = await sub.receive(1, timeout=10.0)
                assert len(got) == 1
                await got[0].dead_letter("RejectMessage: bad")
        finally:
            await transport.close()

    asyncio.run(dead_letter())
    where = ["--broker", redis_url, "--topic", topic, "--group", group]
    shown = json.loads(msdata("dlq", "show", *where, message_id, "--json").stdout)
    out = msdata("dlq", "show", *where, message_id).stdout
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out, out
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == list(shown), lines
    assert lines[0] == f"dlq: {topic}.{group}.dlq", lines
    assert "id: id\\r\\nreason: forged\\x1b[2J\\x07" in lines
    assert "body: body\\r\\nreason: forged too\\x1b]0;t\\x07 " + "x" * 300 in lines
    assert [line for line in lines if line.startswith("reason: ")] == ["reason: RejectMessage: bad"]


def test_dead_letter_log_line_escapes_a_foreign_id(caplog: pytest.LogCaptureFixture) -> None:
    from msdata.deadletter import dead_letter
    from msdata.transport import TransportMessage

    message = TransportMessage(id="a\x1b]0;t\x07b", body=b"{}")
    with caplog.at_level(logging.WARNING, logger="msdata.deadletter"):
        dead_letter(message, "orders", "billing", 1, "bad").log()
    (record,) = caplog.records
    assert "\x1b" not in record.getMessage() and "a\\x1b]0;t\\x07b" in record.getMessage()


@pytest.mark.redis
def test_dlq_list_show_and_replay(redis_url: str) -> None:
    from msdata.errors import RejectMessage
    from msdata.events import EventBus
    from msdata.urls import transport_from_url

    topic, group = f"cli-{uuid.uuid4().hex[:8]}", "billing"
    got: list[int] = []

    async def dead_letter_two() -> None:
        transport = transport_from_url(redis_url)
        bus = EventBus(transport, registry=registry)

        rejected: list[int] = []

        @bus.handler(Tick, group=group, topic=topic)
        async def reject(event: Tick) -> None:
            rejected.append(event.n)
            raise RejectMessage(f"tick {event.n} is bad")

        async with bus:
            await bus.publish(Tick(n=1), topic=topic)
            await bus.publish(Tick(n=2), topic=topic)
            await eventually(lambda: len(rejected) == 2, timeout=10, what="both rejected")
        await transport.close()

    asyncio.run(dead_letter_two())
    where = ["--broker", redis_url, "--topic", topic, "--group", group]
    listed = json.loads(msdata("dlq", "list", *where, "--json").stdout)
    assert sorted(d["reason"] for d in listed) == [
        "RejectMessage: tick 1 is bad",
        "RejectMessage: tick 2 is bad",
    ]
    assert len(json.loads(msdata("dlq", "list", *where, "--json").stdout)) == 2  # still there
    assert len(json.loads(msdata("dlq", "list", *where, "--limit", "1", "--json").stdout)) == 1
    cut = msdata("dlq", "list", *where, "--limit", "1").stdout  # the table says it was cut
    assert "the first 1 of" in cut and "--limit N reads more" in cut
    assert "reads more" not in msdata("dlq", "list", *where, "--limit", "3").stdout
    shown = json.loads(msdata("dlq", "show", *where, listed[0]["id"], "--json").stdout)
    assert shown["id"] == listed[0]["id"] and '"specversion"' in shown["body"]

    async def consume_replayed() -> None:
        transport = transport_from_url(redis_url)
        bus = EventBus(transport, registry=registry)
        bus.subscribe(Tick, lambda e: got.append(e.n), group=group, topic=topic)
        async with bus:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "msdata.cli",
                "dlq",
                "replay",
                *where,
                "--json",
                env=ENV,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            assert json.loads(out) == {"replayed": 2}
            await eventually(lambda: len(got) == 2, timeout=10, what="both replayed")
        await transport.close()

    asyncio.run(consume_replayed())
    assert sorted(got) == [1, 2]
    assert json.loads(msdata("dlq", "list", *where, "--json").stdout) == []


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("redis_url", id="redis", marks=pytest.mark.redis),
        pytest.param("amqp_url", id="rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("nats_url", id="nats", marks=pytest.mark.nats),
    ],
)
def test_dlq_replay_at_once_delivers_every_message_with_its_id(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """Dead-lettered within a second of their publish and replayed at once (as after a
    deploy in the wrong order): every replayed event reaches the group, with its own id (a
    second group sees each id twice), and the dead-letter topic is empty. On NATS the
    replay used to be dropped as a duplicate of the first publish (``Nats-Msg-Id`` inside
    the 120 s window) while the command said it replayed them and emptied the topic."""
    from msdata.errors import RejectMessage
    from msdata.events import EventBus
    from msdata.urls import transport_from_url

    url = request.getfixturevalue(broker)
    topic, group, audit = f"cli-{uuid.uuid4().hex[:8]}", "billing", "audit"
    where = ["--broker", url, "--topic", topic, "--group", group]
    got: list[int] = []
    seen: list[str] = []

    async def run() -> None:
        transport = transport_from_url(url)
        try:
            await transport.declare_group(topic, audit)
            bus = EventBus(transport, registry=registry)
            rejected: list[int] = []

            @bus.handler(Tick, group=group, topic=topic)
            async def reject(event: Tick) -> None:
                rejected.append(event.n)
                raise RejectMessage(f"tick {event.n} is bad")

            async with bus:
                await bus.publish_many([Tick(n=i) for i in range(3)], topic=topic)
                await eventually(lambda: len(rejected) == 3, timeout=10, what="all rejected")
            fixed = EventBus(transport, registry=registry)
            fixed.subscribe(Tick, lambda e: got.append(e.n), group=group, topic=topic)
            async with fixed:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "msdata.cli", "dlq", "replay", *where, "--json",
                    env=ENV, stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await proc.communicate()
                assert json.loads(out) == {"replayed": 3}
                await eventually(lambda: len(got) == 3, timeout=10, what="all replayed")
            async with transport.subscribe(topic, audit) as sub:

                async def all_seen() -> bool:
                    for d in await sub.receive(10, timeout=0.5):
                        seen.append(d.message.id)
                        await d.ack()
                    return len(seen) >= 6

                await eventually(all_seen, timeout=10, what="the audit group's six")
        finally:
            await transport.close()

    asyncio.run(run())
    assert sorted(got) == [0, 1, 2]
    assert len(seen) == 6 and len(set(seen)) == 3  # each id twice: the replay kept it
    assert all(seen.count(i) == 2 for i in seen)
    assert json.loads(msdata("dlq", "list", *where, "--json").stdout) == []


def test_projections_status_and_rebuild(tmp_path: Path) -> None:
    (tmp_path / "shop.py").write_text(
        textwrap.dedent(
            f"""
            from msdata import Event, MessageRegistry
            from msdata.messages import message_type
            from msdata.projections import Projection, handles
            from msdata.service import Service

            registry = MessageRegistry()

            @message_type("shop.Sold", registry=registry)
            class Sold(Event):
                amount: int

            class Totals(Projection):
                name = "totals"

                def setup(self, conn, generation):
                    conn.execute(f"CREATE TABLE IF NOT EXISTS totals_{{generation}} (n INT)")
                    conn.execute(f"DELETE FROM totals_{{generation}}")
                    conn.execute(f"INSERT INTO totals_{{generation}} VALUES (0)")

                @handles(Sold)
                def sold(self, ctx, event):
                    ctx.conn.execute(f"UPDATE totals_{{ctx.generation}} SET n = n + ?",
                                     (event.amount,))

            service = Service("shop", db="sqlite:///{tmp_path}/shop.db", registry=registry)
            service.projection(Totals())
            """
        )
    )
    # some events in the shop's event store
    sys.path.insert(0, str(tmp_path))
    try:
        import shop  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))

    async def sell() -> None:
        svc = Service("shop", db=f"sqlite:///{tmp_path}/shop.db", registry=shop.registry)
        events = svc.events  # before start: its tables are created at start
        async with svc, svc.transaction() as conn:
            await events.append_async(conn, "s-1", 0, [shop.Sold(amount=2)] * 3)

    asyncio.run(sell())
    line = fails("projections", "status", "--app", "shop:service", cwd=tmp_path)
    assert f"missing in sqlite:///{tmp_path}/shop.db" in line
    msdata("db", "init", f"sqlite:///{tmp_path}/shop.db")
    status = json.loads(
        msdata("projections", "status", "--app", "shop:service", "--json", cwd=tmp_path).stdout
    )
    assert status == [
        {
            "name": "totals",
            "generation": 0,  # never ran: status sets nothing up
            "position": 0,
            "lag_events": 3,
            "lag_seconds": status[0]["lag_seconds"],
        }
    ]
    rebuilt = msdata(
        "projections", "rebuild", "totals", "--app", "shop:service", "--json", cwd=tmp_path
    ).stdout
    assert json.loads(rebuilt) == {"name": "totals", "generation": 2}
    import sqlite3

    with sqlite3.connect(tmp_path / "shop.db") as conn:
        assert conn.execute("SELECT n FROM totals_2").fetchone()[0] == 6
    assert "no projection 'nope'" in fails(
        "projections", "rebuild", "nope", "--app", "shop:service", cwd=tmp_path
    )


# -- sagas ----------------------------------------------------------------------------------

APP = """
from pathlib import Path

from pydantic import BaseModel

from msdata import Command, MessageRegistry
from msdata.errors import SagaStepFailed
from msdata.messages import message_type
from msdata.saga import Retry, Saga, remote
from msdata.service import Service

HERE = Path(__file__).parent
registry = MessageRegistry()


@message_type("clisaga.Ship", registry=registry)
class Ship(Command):
    order_id: str


class Order(BaseModel):
    order_id: str


def release(order: Order) -> None:
    if (HERE / "broken").exists():
        raise RuntimeError("stock service down")


def fail(order: Order) -> None:
    raise SagaStepFailed("card declined")


refund = (
    Saga("refund", Order, compensation_retry=Retry(1))
    .step("reserve", lambda o: None, compensate=release)
    .pivot("charge", fail)
)
ship = (
    Saga("ship", Order)
    .step(
        "book", remote(lambda o: Ship(order_id=o.order_id)), compensate=lambda o: None,
        timeout=60,
    )
    .pivot("ship", lambda o: None)
)

service = Service(
    "shop", db=f"sqlite:///{HERE}/shop.db", registry=registry,
    saga_options={"lease_seconds": 0.3},
)
service.saga(refund)
service.saga(ship)
"""


def test_sagas_list_show_retry_and_abort(tmp_path: Path) -> None:
    (tmp_path / "shop_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "broken").touch()
    sys.path.insert(0, str(tmp_path))
    try:
        import shop_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))

    async def start_two() -> tuple[str, str]:
        async with shop_app.service as svc:
            failed = await svc.sagas.run(shop_app.refund, shop_app.Order(order_id="o-1"))
            waiting = await svc.sagas.start(shop_app.ship, shop_app.Order(order_id="o-2"))
        assert failed.status is SagaStatus.FAILED, failed
        assert waiting.status is SagaStatus.RUNNING, waiting
        return failed.saga_id, waiting.saga_id

    failed_id, waiting_id = asyncio.run(start_two())
    db = ["--db", f"sqlite:///{tmp_path}/shop.db"]
    listed = json.loads(msdata("sagas", "list", *db, "--status", "FAILED", "--json").stdout)
    assert [s["saga_id"] for s in listed] == [failed_id]
    assert "stock service down" in (listed[0]["error"] or "")
    assert failed_id in msdata("sagas", "list", *db).stdout
    # --stuck lists what SagaOrchestrator.stuck() does: FAILED ones wait for an operator
    stuck = json.loads(msdata("sagas", "list", *db, "--stuck", "--json").stdout)
    assert failed_id in [s["saga_id"] for s in stuck]
    shown = json.loads(msdata("sagas", "show", failed_id, *db, "--json").stdout)
    assert shown["data"] == {"order_id": "o-1"}
    assert shown["history"][0]["event"] == "started"
    assert "FAILED" in msdata("sagas", "show", failed_id, *db).stdout
    assert "no saga instance" in fails("sagas", "show", "no-such-saga", *db)

    app = ["--app", "shop_app:service"]
    line = fails("sagas", "retry", waiting_id, *app, cwd=tmp_path)
    assert "only a FAILED one" in line
    proc = msdata("sagas", "retry", failed_id, *app, "--json", cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["status"] == "FAILED"
    assert proc.stderr.startswith(f"error: saga {failed_id} failed again"), proc.stderr
    (tmp_path / "broken").unlink()
    retried = json.loads(msdata("sagas", "retry", failed_id, *app, "--json", cwd=tmp_path).stdout)
    assert retried["status"] == "COMPENSATED"

    time.sleep(0.4)  # the ship saga's lease (0.3 s) has run out: nobody runs it now
    aborted = json.loads(
        msdata(
            "sagas",
            "abort",
            waiting_id,
            *app,
            "--reason",
            "customer called",
            "--json",
            cwd=tmp_path,
        ).stdout
    )
    assert aborted["status"] == "COMPENSATED"
    assert "only a RUNNING one" in fails("sagas", "abort", waiting_id, *app, cwd=tmp_path)


def test_dlq_reads_a_namespaced_transport(redis_url: str, tmp_path: Path) -> None:
    """The service's namespace (or --namespace) is where its dead letters are."""
    from msdata.errors import RejectMessage
    from msdata.events import EventBus
    from msdata.urls import transport_from_url

    namespace, topic, group = f"cli{uuid.uuid4().hex[:8]}", "cli-ns", "billing"

    async def dead_letter_one() -> None:
        transport = transport_from_url(redis_url, namespace=namespace)
        bus = EventBus(transport, registry=registry)
        rejected: list[int] = []

        @bus.handler(Tick, group=group, topic=topic)
        async def reject(event: Tick) -> None:
            rejected.append(event.n)
            raise RejectMessage("bad tick")

        async with bus:
            await bus.publish(Tick(n=1), topic=topic)
            await eventually(lambda: rejected == [1], timeout=10, what="rejected")
        await transport.close()

    asyncio.run(dead_letter_one())
    where = ["--broker", redis_url, "--topic", topic, "--group", group]
    listed = json.loads(msdata("dlq", "list", *where, "--namespace", namespace, "--json").stdout)
    assert [d["reason"] for d in listed] == ["RejectMessage: bad tick"]
    assert listed[0]["attempts"] == 1  # a number, not the header's text
    # not global names: without the namespace there is no such group, so no such topic
    assert "no such dead-letter topic" in fails("dlq", "list", *where)
    (tmp_path / "ns_app.py").write_text(
        textwrap.dedent(f"""
            from msdata.service import Service
            from msdata.urls import transport_from_url
            from tests.test_cli import Tick, registry

            service = Service(
                "{group}",
                db="memory://",
                broker=transport_from_url("{redis_url}", namespace="{namespace}"),
                registry=registry,
            )
            service.subscribe(Tick, lambda e: None, topic="{topic}")
        """)
    )
    env_cwd = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "msdata.cli", "dlq", "list", "--app", "ns_app:service", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(env_cwd), *sys.path])},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert [d["id"] for d in json.loads(proc.stdout)] == [listed[0]["id"]]
    # the service's replay empties the namespaced dead-letter topic
    msdata("dlq", "replay", *where, "--namespace", namespace, "--json")


def test_console_script_without_the_cli_extra_prints_one_line() -> None:
    code = "import sys; sys.modules['click'] = None; from msdata._console import main; main([])"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'cli' extra" in lines[0], proc.stderr


# -- trace ----------------------------------------------------------------------------------


class TickCount(BaseModel):
    n: int


counting = (
    Saga("count", TickCount)
    .step("count", lambda d: None, compensate=lambda d: None)
    .pivot("done", lambda d: None)
)


async def traced_work(db: Db) -> tuple[Any, Any, str]:
    """In one service: a root message, a message and an event it caused, a message of another
    correlation, and a saga whose id is the root's correlation id. Returns the root, its
    child message and the saga's id."""
    service = Service("cli", db=db.url, schema=db.schema, registry=registry, relay=False)
    service.saga(counting)
    events = service.events
    root = make_envelope(Tick(n=0), registry=registry, source="cli")
    assert root.correlation_id is not None
    async with service:
        async with service.transaction() as conn:
            await service.publish(root)
            with handling(root):
                (child,) = await service.publish(Tick(n=1))
                await events.append_async(conn, "ticks-1", 0, [Tick(n=2)])
            await service.publish(Tick(n=3))  # another correlation id
        rec = await service.sagas.run(counting, TickCount(n=1), saga_id=root.correlation_id)
        assert rec.status is SagaStatus.COMPLETED
    return root, child, rec.saga_id


def test_trace_prints_the_timeline_of_a_correlation_id(db: Db, tmp_path: Path) -> None:
    msdata("db", "init", db.url, *db.options)
    root, child, saga_id = asyncio.run(traced_work(db))
    corr = root.correlation_id
    data = json.loads(msdata("trace", corr, "--db", db.url, *db.options, "--json").stdout)
    assert data["correlation_id"] == corr and data["missing"] == []
    assert len(data["read"]) == 3  # outbox, event store, sagas
    entries = data["entries"]
    assert [(e["kind"], e["message_id"]) for e in entries[:2]] == [
        ("message", root.id),
        ("message", child.id),
    ]
    assert entries[1]["causation_id"] == root.id and entries[1]["type"] == "cli.Tick"
    assert entries[0]["where"].endswith(": pending") and entries[0]["service"]
    # the event: in the event store, and in the outbox (the service's event log publishes it)
    event = entries[2:4]
    assert {e["kind"] for e in event} == {"event", "message"}
    assert len({e["message_id"] for e in event}) == 1
    assert {e["causation_id"] for e in event} == {root.id}
    steps = entries[4:]
    assert steps and {e["kind"] for e in steps} == {"saga_step"}
    assert (steps[0]["detail"]["event"], steps[-1]["detail"]["event"]) == ("started", "completed")
    assert "count" in {e["type"] for e in steps}
    times = [e["time"] for e in entries]
    assert times == sorted(times)
    table = msdata("trace", corr, "--db", db.url, *db.options).stdout
    assert f"trace of {corr}" in table and "cli.Tick" in table and "saga step" in table
    other = json.loads(msdata("trace", "no-such-id", "--db", db.url, *db.options, "--json").stdout)
    assert other["entries"] == []
    assert "nothing carries" in msdata("trace", "no-such-id", "--db", db.url, *db.options).stdout

    # the same from the stores the service configures
    (tmp_path / "traced_app.py").write_text(
        "from msdata.service import Service\n"
        f"service = Service('cli', db={db.url!r}, schema={db.schema!r}, relay=False)\n"
    )
    by_app = json.loads(
        msdata("trace", corr, "--app", "traced_app:service", "--json", cwd=tmp_path).stdout
    )
    assert [e["message_id"] for e in by_app["entries"]] == [e["message_id"] for e in entries]
    assert {e["service"] for e in by_app["entries"]} == {"cli"}
    assert saga_id == corr


def test_trace_reads_what_has_tables_and_says_what_has_none(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/only_outbox.db"
    msdata("db", "init", url, "--port", "outbox")
    data = json.loads(msdata("trace", "x", "--db", url, "--json").stdout)
    assert data["read"] == [f"{url} outbox"]
    assert data["missing"] == [f"{url} event store", f"{url} sagas"]
    empty = f"sqlite:///{tmp_path}/inbox_only.db"
    msdata("db", "init", empty, "--port", "inbox")
    assert "none of the stores has its tables" in fails("trace", "x", "--db", empty)
    assert "--app module:service or --db URL" in usage("trace", "x")


@pytest.mark.rabbitmq
@pytest.mark.parametrize("first", ["cli", "service"])
@pytest.mark.parametrize("mode", ["quorum", "ordered"])
def test_dlq_with_a_bare_amqp_url_and_a_quorum_or_ordered_service_both_read(
    amqp_url: str, mode: str, first: str
) -> None:
    """``--broker amqp://...`` cannot say quorum or ordered; the service's transport does.
    Both read the same dead letters, in either order (the first used to declare the
    ``msdata-dlq`` reader's queue with its own mode, and the other failed on it)."""
    from msdata.adapters.rabbitmq import RabbitMQTransport
    from msdata.service import read_dead_letters
    from msdata.transport import TransportMessage

    namespace, topic, group = f"cli{uuid.uuid4().hex[:8]}", "orders", "g"
    options: dict[str, Any] = (
        {"queue_type": "quorum"} if mode == "quorum" else {"ordered_per_key": True}
    )
    where = ["--broker", amqp_url, "--namespace", namespace, "--topic", topic, "--group", group]

    def cli_ids() -> list[str]:
        return [d["id"] for d in json.loads(msdata("dlq", "list", *where, "--json").stdout)]

    async def run() -> None:
        t = RabbitMQTransport.from_url(amqp_url, namespace=namespace, **options)
        try:
            await t.declare_group(topic, group)
            await t.publish(topic, [TransportMessage(id="m1", body=b"{}")])
            async with t.subscribe(topic, group) as sub:
                (d,) = await sub.receive(timeout=5)
                await d.dead_letter("bad")
            if first == "cli":
                assert await asyncio.to_thread(cli_ids) == ["m1"]
            assert [i.id for i in await read_dead_letters(t, [(topic, group)])] == ["m1"]
            if first == "service":
                assert await asyncio.to_thread(cli_ids) == ["m1"]
        finally:
            await t.close()

    asyncio.run(run())


@pytest.mark.nats
@pytest.mark.parametrize("replayer", ["cli", "service"])
def test_dlq_with_a_bare_nats_url_and_an_ordered_service_read_and_replay_the_same(
    nats_url: str, replayer: str
) -> None:
    """``--broker nats://...`` cannot say ordered; an ordered service's transport is. Both
    list the same ten dead letters (ten keys), and a replay by one leaves nothing for the
    other (the ordered one read them as an ordered group of its own, one letter per key
    partition at a time: 4 of 10 listed, and the other's replay still listed there)."""
    from msdata.adapters.nats import NatsTransport
    from msdata.service import read_dead_letters
    from msdata.transport import TransportMessage

    namespace, topic, group = f"cli{uuid.uuid4().hex[:8]}", "orders", "g"
    where = ["--broker", nats_url, "--namespace", namespace, "--topic", topic, "--group", group]
    sent = [TransportMessage(id=f"m{n}", body=b'{"n":%d}' % n, key=f"key-{n}") for n in range(10)]
    ids = sorted(m.id for m in sent)

    def cli_ids(command: str) -> list[str]:
        out = msdata("dlq", command, *where, "--json").stdout
        return sorted(d["id"] for d in json.loads(out))

    async def run() -> None:
        t = NatsTransport.from_url(nats_url, namespace=namespace, ordered=True)
        try:
            await t.declare_group(topic, group)
            await t.publish(topic, sent)
            async with t.subscribe(topic, group, prefetch=10) as sub:
                moved = 0
                while moved < 10:
                    for d in await sub.receive(10, timeout=5):
                        await d.dead_letter("bad")
                        moved += 1
            assert await asyncio.to_thread(cli_ids, "list") == ids
            assert sorted(i.id for i in await read_dead_letters(t, [(topic, group)])) == ids
            if replayer == "cli":
                out = await asyncio.to_thread(msdata, "dlq", "replay", *where, "--json")
                assert json.loads(out.stdout) == {"replayed": 10}
                assert await read_dead_letters(t, [(topic, group)]) == []
            else:
                replayed = await read_dead_letters(t, [(topic, group)], replay=True)
                assert sorted(i.id for i in replayed) == ids
                assert await asyncio.to_thread(cli_ids, "list") == []
        finally:
            await t.close()

    asyncio.run(run())
