"""The ``msdata`` command line: create schemas, run the outbox relay, and operate what the
patterns leave for people (parked outbox rows, dead letters, projections). See docs/cli.md.

Needs the ``cli`` extra (Click and Rich): ``pip install "./msdata[cli]"`` from a checkout.
Every command that reports prints a table for people, or JSON with ``--json``; a bad URL,
an unreachable server or a missing schema prints one line naming the problem (credentials
redacted) and exits 1, never a traceback; bad usage exits 2.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

try:
    import click
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from msdata.errors import MissingDependencyError

    raise MissingDependencyError(e.name or "click", "cli") from e

from msdata.errors import ConfigurationError, MsdataError, SchemaError
from msdata.messages import safe_text
from msdata.transport import DEAD_LETTER_READER
from msdata.urls import (
    DATABASES,
    STORES,
    redact_url,
    store_backend,
    store_from_url,
    transport_from_url,
)

__all__ = ["main"]

T = TypeVar("T")

#: exit codes: 0 done, 1 a problem named on stderr, 2 bad usage (Click's)
FAILED = 1

# piped output (scripts, less, logs) gets wide lines rather than truncated ids
_out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


class Failure(Exception):
    """A problem to report in one line and exit 1."""


#: loggers of the broker and database drivers, quiet without ``-v``
_DRIVER_LOGGERS = ("aiormq", "aio_pika", "nats", "redis", "asyncpg", "psycopg")


#: the type of every count or limit option: a whole number, at least 1 (0 or less is a usage
#: error, not an empty answer), at most 2**63 - 1 (a row's seq is a signed 64-bit integer in
#: SQLite and PostgreSQL: a larger one failed in the driver, after the others were requeued)
COUNT = click.IntRange(min=1, max=2**63 - 1)


def _fail(message: str) -> NoReturn:
    raise Failure(message)


def _backend(url: str) -> str:
    backend = store_backend(url)
    if backend not in DATABASES:
        _fail(f"not a database URL: {redact_url(url)} (use sqlite:///path.db or postgresql://…)")
    assert backend is not None
    return backend


def _existing_db(url: str) -> str:
    """``url`` for a command that reads a database: a SQLite file must exist (connecting
    would create an empty one), memory:// holds nothing between processes."""
    backend = _backend(url)
    if backend == "memory":
        _fail("memory:// keeps nothing between processes: give a sqlite:// or postgresql:// URL")
    if backend == "sqlite":
        from msdata.adapters.sqlite.transactions import SqliteTransactions

        path = SqliteTransactions.from_url(url).path  # opens nothing
        if not os.path.exists(path):
            _fail(f"no database file at {path} (create it with: msdata db init {url})")
    return url


def _store(port: str, url: str, prefix: str, schema: str | None) -> Any:
    options: dict[str, Any] = {"table_prefix": prefix}
    if schema is not None:
        if store_backend(url) == "sqlite":  # a usage error, not the store's refusal
            raise click.BadParameter(
                f"a PostgreSQL option: {redact_url(url)} has no schemas", param_hint="--schema"
            )
        options["schema"] = schema
    return store_from_url(port, url, **options)


def _describe(e: BaseException, urls: Sequence[str]) -> str:
    text = str(e) or type(e).__name__
    for url in urls:
        if url and url in text:
            text = text.replace(url, redact_url(url))
    if isinstance(e, SchemaError):
        where = urls[0] if urls else "the database"
        return (
            f"the msdata tables are missing in {redact_url(where)} ({text}); "
            "create them with: msdata db init URL"
        )
    if isinstance(e, MsdataError | Failure):
        return text
    if isinstance(e, OSError | ConnectionError | TimeoutError):
        return f"cannot connect: {text}"
    return f"{type(e).__name__}: {text}"


def _run(urls: Callable[[dict[str, Any]], Sequence[str]] | None = None) -> Callable[..., Any]:
    """Decorate an async command: run it, turn any error into one line on stderr + exit 1."""

    def decorate(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> None:
            shown = [u for u in (urls(kwargs) if urls else ()) if isinstance(u, str)]
            verbose = click.get_current_context().find_root().params.get("verbose", False)
            if not verbose:  # a one-shot command: its outcome is its output
                logging.getLogger("msdata").setLevel(logging.ERROR)
            try:
                asyncio.run(fn(**kwargs))
            except KeyboardInterrupt:
                sys.exit(130)
            except (click.exceptions.Exit, click.ClickException):
                raise
            except Exception as e:
                _err.print(f"error: {_shown(_describe(e, shown + _app_urls))}", markup=False)
                sys.exit(FAILED)

        return wrapper

    return decorate


def _emit(
    as_json: bool, data: Any, table: Callable[[], Table | str | list[tuple[str, Any]]]
) -> None:
    """Print ``data`` as JSON, or what ``table`` makes of it: a Table, one line of text, or
    (name, value) fields, one ``name: value`` line each. Every value is escaped by
    :func:`_shown` before it is laid out, so a line break inside one (a foreign message id
    or body) is shown as ``\\n``, never as a line of its own."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_jsonable))
    else:
        out = table()
        # soft_wrap: a line (a long body) is not broken at the console's width either
        if isinstance(out, str):
            _out.print(_shown(out), markup=False, soft_wrap=True)
        elif isinstance(out, list):
            fields = "\n".join(f"{_shown(k)}: {_shown(v)}" for k, v in out)
            _out.print(fields, markup=False, soft_wrap=True)
        else:
            if isinstance(out.caption, str):
                out.caption = Text(_shown(out.caption))
            _out.print(out)


def _shown(v: Any) -> str:
    """``v`` as one line for the terminal, never cut: control characters (ESC, BEL, line
    breaks) escaped by :func:`~msdata.messages.safe_text`, so a foreign message id, body or
    reason cannot move the cursor, retitle the window or clear the operator's screen."""
    return "" if v is None else safe_text(str(_jsonable(v)), sys.maxsize)


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=Text(_shown(title)), title_justify="left", highlight=False)
    for c in columns:
        t.add_column(c, overflow="fold")  # wrap long ids and errors, never cut them
    for r in rows:
        t.add_row(*(Text(_shown(v)) for v in r))
    return t


# -- options shared by commands ------------------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
prefix_option = click.option(
    "--prefix", default="msdata_", show_default=True, help="Table-name prefix of the stores."
)
schema_option = click.option("--schema", default=None, help="PostgreSQL schema of the stores.")
db_option = click.option("--db", required=True, help="The service's database URL.")
namespace_option = click.option(
    "--namespace",
    default=None,
    help="The transport's namespace (the prefix of its names on the broker).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log msdata's INFO messages to stderr.")
def cli(verbose: bool) -> None:
    """msdata: operate the data-management patterns of a service."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # msdata logs what matters of a connection; the drivers repeat it
        for driver in _DRIVER_LOGGERS:
            logging.getLogger(driver).setLevel(logging.CRITICAL)


# -- db ------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schemas."""


def _ports(backend: str) -> list[str]:
    return sorted({p for p, b in STORES if b == backend})


@db.command("init")
@click.argument("url")
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
@prefix_option
@schema_option
@click.option(
    "--port",
    "ports",
    multiple=True,
    help="Only these stores (outbox, inbox, eventstore, checkpoints, …); default: all.",
)
@_run(lambda kw: [kw["url"]])
async def db_init(
    url: str, print_sql: bool, prefix: str, schema: str | None, ports: tuple[str, ...]
) -> None:
    """Create every msdata table in the database at URL (idempotent)."""
    backend = _backend(url)
    if backend == "memory":
        _fail("memory:// has no schema to create")
    known = _ports(backend)
    for p in ports:
        if p not in known:
            _fail(f"no {p!r} store on {backend}: choose from {', '.join(known)}")
    chosen = list(ports) or known
    stores = [(p, _store(p, url, prefix, schema)) for p in chosen]
    try:
        if print_sql:
            for p, store in stores:
                click.echo(f"-- {p}\n{store.schema_sql().strip()}\n")
            return
        for _, store in stores:
            await store.create_schema()
    finally:
        for _, store in stores:
            await store.close()
    _out.print(f"created the {', '.join(chosen)} tables in {redact_url(url)}", markup=False)


# -- relay ---------------------------------------------------------------------------------


@cli.group()
def relay() -> None:
    """The outbox relay."""


@relay.command("run")
@db_option
@click.option("--broker", required=True, help="The broker URL (redis://, amqp://, nats://).")
@namespace_option
@prefix_option
@schema_option
@click.option("--batch-size", default=100, show_default=True, type=COUNT, help="Rows per claim.")
@click.option("--name", default="relay", show_default=True, help="The process's name.")
def relay_run(
    db: str,
    broker: str,
    namespace: str | None,
    prefix: str,
    schema: str | None,
    batch_size: int,
    name: str,
) -> None:
    """Publish the outbox of --db to --broker until SIGTERM or SIGINT."""
    from msdata.service import Service

    try:
        _existing_db(db)
        if broker.split("://", 1)[0].lower() == "memory":
            _fail("memory:// is a broker inside one process: give redis://, amqp:// or nats://")
        # a missing schema or an unreachable database fails here, in one line
        asyncio.run(_check_outbox(db, prefix, schema))
        service = Service(
            name,
            db=db,
            # a namespaced transport is opened here; the process ends with the relay
            broker=_open_transport(broker, namespace) if namespace else broker,
            table_prefix=prefix,
            schema=schema,
            create_schema=False,
            relay_options={"batch_size": batch_size},
        )
        _err.print(
            f"relay {name}: {redact_url(db)} -> {redact_url(broker)} (SIGTERM to stop)",
            markup=False,
        )
        service.run()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        _err.print(f"error: {_describe(e, [db, broker])}", markup=False)
        sys.exit(FAILED)
    _err.print(f"relay {name}: stopped", markup=False)


async def _check_outbox(db: str, prefix: str, schema: str | None) -> None:
    store = _outbox_store(db, prefix, schema)
    try:
        await store.status()
    finally:
        await store.close()


# -- outbox --------------------------------------------------------------------------------


@cli.group()
def outbox() -> None:
    """The outbox: backlog, parked rows."""


def _outbox_store(db: str, prefix: str, schema: str | None) -> Any:
    return _store("outbox", _existing_db(db), prefix, schema)


@outbox.command("status")
@db_option
@prefix_option
@schema_option
@json_option
@_run(lambda kw: [kw["db"]])
async def outbox_status(db: str, prefix: str, schema: str | None, as_json: bool) -> None:
    """Pending rows, the age of the oldest (the relay's lag) and parked rows."""
    store = _outbox_store(db, prefix, schema)
    try:
        st = await store.status()
    finally:
        await store.close()
    data = {"pending": st.pending, "oldest_pending_age": st.oldest_pending_age, "parked": st.parked}
    age = "-" if st.oldest_pending_age is None else f"{st.oldest_pending_age:.1f} s"
    _emit(
        as_json,
        data,
        lambda: _table(
            f"outbox of {redact_url(db)}",
            ["pending", "oldest pending", "parked"],
            [[st.pending, age, st.parked]],
        ),
    )


@outbox.command("parked")
@db_option
@prefix_option
@schema_option
@click.option("--limit", default=100, show_default=True, type=COUNT)
@json_option
@_run(lambda kw: [kw["db"]])
async def outbox_parked(
    db: str, prefix: str, schema: str | None, limit: int, as_json: bool
) -> None:
    """Rows the relay gave up on, oldest first, with their last error."""
    store = _outbox_store(db, prefix, schema)
    try:
        rows = await store.parked(limit)
    finally:
        await store.close()
    data = [
        {
            "seq": r.seq,
            "message_id": r.message_id,
            "topic": r.topic,
            "type": r.type,
            "key": r.partition_key,
            "attempts": r.attempts,
            "created_at": r.created_at,
            "last_error": r.last_error,
        }
        for r in rows
    ]
    _emit(
        as_json,
        data,
        lambda: (
            _table(
                f"parked outbox rows in {redact_url(db)}",
                ["seq", "topic", "type", "key", "attempts", "last error"],
                [
                    [d["seq"], d["topic"], d["type"], d["key"], d["attempts"], d["last_error"]]
                    for d in data
                ],
            )
            if data
            else "no parked rows"
        ),
    )


@outbox.command("requeue")
@db_option
@prefix_option
@schema_option
@click.argument("seqs", nargs=-1, type=COUNT)
@click.option("--all", "everything", is_flag=True, help="Requeue every parked row.")
@json_option
@_run(lambda kw: [kw["db"]])
async def outbox_requeue(
    db: str,
    prefix: str,
    schema: str | None,
    seqs: tuple[int, ...],
    everything: bool,
    as_json: bool,
) -> None:
    """Make parked rows (by SEQ, or --all) pending again, attempts reset."""
    if not seqs and not everything:
        raise click.UsageError(
            "name the rows to requeue (their seq, see `msdata outbox parked`) or pass --all"
        )
    if seqs and everything:
        raise click.UsageError("name the rows to requeue or pass --all, not both")
    store = _outbox_store(db, prefix, schema)
    missed: list[int] = []
    try:
        if seqs:
            # one at a time (a command line names a few), so as to say which were not parked
            n = 0
            for seq in dict.fromkeys(seqs):
                done = await store.requeue([seq])
                n += done
                if not done:
                    missed.append(seq)
        else:
            n = 0
            while batch := await store.parked(1000):
                done = await store.requeue([r.seq for r in batch])
                n += done
                if done == 0:
                    break
    finally:
        await store.close()
    _emit(as_json, {"requeued": n, "not_parked": missed}, lambda: f"requeued {n} row(s)")
    if missed:
        _fail(
            "not requeued, no parked row with that seq (no such row, or pending or sent): "
            + ", ".join(map(str, missed))
        )


# -- dead letters --------------------------------------------------------------------------

#: the consumer group the command line reads dead-letter topics with
DLQ_READER = DEAD_LETTER_READER


@cli.group()
def dlq() -> None:
    """Dead-letter topics (topic.group.dlq): list, show, replay."""


def _open_transport(broker: str, namespace: str | None) -> Any:
    return transport_from_url(broker, **({"namespace": namespace} if namespace else {}))


def _dlq_source(
    broker: str | None, namespace: str | None, topic: str | None, group: str | None, app: str | None
) -> tuple[Any, list[tuple[str, str]]]:
    """The transport to read and the (topic, group) pairs: with ``app``, the service's own
    transport (its namespace or key prefix) and all its groups."""
    from msdata.transport import check_name

    if app:
        if broker or namespace:
            raise click.UsageError(
                "--app reads the service's own transport: leave out --broker and --namespace"
            )
        service = _load_app(app)
        return service.transport, list(service.subscriptions)
    if not (topic and group):
        raise click.UsageError(
            "name the dead-letter topic with --topic and --group, or give --app module:service"
        )
    if not broker:
        raise click.UsageError("--broker is required without --app")
    if group == DEAD_LETTER_READER:
        raise click.UsageError(
            f"--group {group!r} is the group msdata reads dead-letter topics with: give the "
            "consumer group that gave up on the messages (for --topic X.G.dlq, --topic X "
            "--group G)"
        )
    pairs = [(check_name("topic", topic), check_name("group", group))]
    return _open_transport(broker, namespace), pairs


dlq_options = [
    click.option("--broker", default=None, help="The broker URL (without --app)."),
    namespace_option,
    click.option("--topic", default=None, help="The topic the messages came from."),
    click.option("--group", default=None, help="The consumer group that gave up on them."),
    click.option(
        "--app", default=None, help="module:attr of a Service: its transport and all its groups."
    ),
]


def _with(options: list[Callable[[T], T]]) -> Callable[[T], T]:
    def apply(fn: T) -> T:
        for o in reversed(options):
            fn = o(fn)
        return fn

    return apply


async def _read_dlq(
    source: tuple[Any, list[tuple[str, str]]], limit: int, settle: str, explicit: bool
) -> list[dict[str, Any]]:
    """Read (or replay) the dead letters of the source's (topic, group) pairs whose group
    exists; a pair named on the command line (``explicit``) whose group does not exist is an
    error, "no such dead-letter topic", and nothing is created on the broker."""
    from msdata.service import read_dead_letters
    from msdata.transport import dead_letter_topic

    transport, pairs = source
    try:
        # only where the group exists: reading creates the reader group (and, on some
        # brokers, the topic), and list and show must leave the broker as it is
        kept = []
        for topic, group in pairs:
            if await transport.lag(topic, group) is not None:
                kept.append((topic, group))
            elif not explicit:  # --app: a group the service has not declared yet
                continue
            else:
                _fail(
                    f"no such dead-letter topic: {dead_letter_topic(topic, group)!r}"
                    f" (no consumer group {group!r} on topic {topic!r})"
                )
        pairs = kept
        found = await read_dead_letters(
            transport, pairs, limit=limit, replay=settle == "replay", reader=DLQ_READER
        )
    finally:
        await transport.close()
    return [d._asdict() for d in found]


@dlq.command("list")
@_with(dlq_options)
@click.option(
    "--limit", default=100, show_default=True, type=COUNT, help="At most this many per topic."
)
@json_option
@_run(lambda kw: [kw["broker"]])
async def dlq_list(
    broker: str | None,
    namespace: str | None,
    topic: str | None,
    group: str | None,
    app: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Dead letters (left where they are), with their reason."""
    rows = await _read_dlq(
        _dlq_source(broker, namespace, topic, group, app), limit, "keep", explicit=not app
    )
    data = [{k: v for k, v in r.items() if k not in ("body", "body_base64")} for r in rows]
    per_topic = collections.Counter(d["dlq"] for d in data)
    full = sorted(t for t, n in per_topic.items() if n >= limit)

    def show() -> Table | str:
        if not data:
            return "no dead letters"
        t = _table(
            "dead letters",
            ["dead-letter topic", "id", "key", "attempts", "reason"],
            [[d["dlq"], d["id"], d["key"], d["attempts"], d["reason"]] for d in data],
        )
        if full:  # there may be more than were read
            t.caption = f"the first {limit} of {', '.join(full)}; --limit N reads more"
        return t

    _emit(as_json, data, show)


@dlq.command("show")
@_with(dlq_options)
@click.argument("message_id")
@json_option
@_run(lambda kw: [kw["broker"]])
async def dlq_show(
    broker: str | None,
    namespace: str | None,
    topic: str | None,
    group: str | None,
    app: str | None,
    message_id: str,
    as_json: bool,
) -> None:
    """One dead letter, with its body."""
    rows = await _read_dlq(
        _dlq_source(broker, namespace, topic, group, app), 10_000, "keep", explicit=not app
    )
    found = [r for r in rows if r["id"] == message_id]
    if not found:
        _fail(f"no dead letter {message_id!r} there")
    r = {k: v for k, v in found[0].items() if k != "body_base64" or v is not None}
    _emit(
        as_json,
        r,
        lambda: list(r.items()),
    )


@dlq.command("replay")
@_with(dlq_options)
@click.option(
    "--limit", default=1000, show_default=True, type=COUNT, help="At most this many per topic."
)
@json_option
@_run(lambda kw: [kw["broker"]])
async def dlq_replay(
    broker: str | None,
    namespace: str | None,
    topic: str | None,
    group: str | None,
    app: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Republish dead letters to their original topic (same message id: consumers behind an
    inbox that applied one already skip it) and settle them for the dead-letter reader
    (other groups of the dead-letter topic keep them)."""
    rows = await _read_dlq(
        _dlq_source(broker, namespace, topic, group, app), limit, "replay", explicit=not app
    )
    _emit(as_json, {"replayed": len(rows)}, lambda: f"replayed {len(rows)} message(s)")


# -- projections ---------------------------------------------------------------------------


#: the database URLs of services loaded with --app, for error messages
_app_urls: list[str] = []


def _load_app(spec: str) -> Any:
    """The Service at ``module:attr`` (the current directory is on the import path)."""
    from msdata.service import Service

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        _fail(f"--app takes module:attr (e.g. orders.app:service), not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        _fail(f"cannot import {module_name!r}: {e}")
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            _fail(f"{module_name!r} has no {attr!r}")
    if callable(obj) and not isinstance(obj, Service):
        obj = obj()
    if not isinstance(obj, Service):
        _fail(f"{spec} is a {type(obj).__name__}, not an msdata Service")
    _app_urls.append(obj.db)
    return obj


@cli.group()
def projections() -> None:
    """Projections of a service (--app module:attr names the Service)."""


app_option = click.option(
    "--app", required=True, help="module:attr of the msdata Service (or a function making one)."
)


@projections.command("status")
@app_option
@json_option
@_run()
async def projections_status(app: str, as_json: bool) -> None:
    """Each projection's active generation, checkpoint and lag."""
    service = _load_app(app)
    data = []
    try:
        for name, runner in service.projections.items():
            if await runner.checkpoints.active(name):
                await runner.start()  # reads the active generation and its checkpoint
            # else it never ran: generation 0, every event ahead (nothing is set up here)
            lag = await runner.lag()
            data.append(
                {
                    "name": name,
                    "generation": runner.generation,
                    "position": runner.position,
                    "lag_events": lag.events,
                    "lag_seconds": round(lag.seconds, 3),
                }
            )
    finally:
        await service.stop()
    _emit(
        as_json,
        data,
        lambda: (
            _table(
                f"projections of {service.name}",
                ["name", "generation", "position", "lag (events)", "lag (s)"],
                [list(d.values()) for d in data],
            )
            if data
            else f"{service.name} has no projections"
        ),
    )


@projections.command("rebuild")
@app_option
@click.argument("name")
@click.option("--drop-old", is_flag=True, help="Drop the old generation afterwards.")
@json_option
@_run()
async def projections_rebuild(app: str, name: str, drop_old: bool, as_json: bool) -> None:
    """Rebuild projection NAME from position 0 beside the live one, then switch to it."""
    service = _load_app(app)
    try:
        runner = service.projections.get(name)
        if runner is None:
            _fail(
                f"{service.name} has no projection {name!r}; it has: "
                f"{', '.join(service.projections) or 'none'}"
            )
        if service.fed_by_bus(name):
            _fail(
                f"projection {name!r} follows the bus and keeps no events of its own: "
                "it cannot be rebuilt from position 0 (feed it from an event store to rebuild)"
            )
        for port in ("eventstore", "checkpoints"):
            await service.store(port).create_schema()
        generation = await runner.rebuild(drop_old=drop_old)
    finally:
        await service.stop()
    _emit(
        as_json,
        {"name": name, "generation": generation},
        lambda: f"projection {name}: generation {generation} rebuilt and active",
    )


# -- sagas ---------------------------------------------------------------------------------


@cli.group()
def sagas() -> None:
    """Saga instances: list, show, and the operator's retry and abort."""


def _saga_row(r: Any) -> dict[str, Any]:
    return {
        "saga_id": r.saga_id,
        "type": r.saga_type,
        "status": str(r.status),
        "done": list(r.done),
        "past_pivot": r.past_pivot,
        "error": r.error,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "lease_owner": r.lease_owner,
        "lease_until": r.lease_until,
    }


_STATUSES = ["RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED"]


@sagas.command("list")
@db_option
@prefix_option
@schema_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(_STATUSES, case_sensitive=False),
    help="Only these statuses (repeatable).",
)
@click.option("--type", "saga_type", default=None, help="Only this saga type.")
@click.option(
    "--stuck",
    is_flag=True,
    help="Only the ones needing attention: RUNNING/COMPENSATING ones nobody holds whose "
    "wake time has passed, then FAILED ones (as SagaOrchestrator.stuck()).",
)
@click.option("--limit", default=100, show_default=True, type=COUNT)
@json_option
@_run(lambda kw: [kw["db"]])
async def sagas_list(
    db: str,
    prefix: str,
    schema: str | None,
    statuses: tuple[str, ...],
    saga_type: str | None,
    stuck: bool,
    limit: int,
    as_json: bool,
) -> None:
    """Instances, least recently updated first."""
    from msdata.ids import utc_now
    from msdata.saga import SagaStatus

    store = _store("saga", _existing_db(db), prefix, schema)
    wanted = [SagaStatus(s.upper()) for s in statuses] or None
    try:
        rows = await store.find(
            saga_type=saga_type,
            statuses=wanted,
            stuck_at=utc_now() if stuck else None,
            limit=limit,
        )
        if stuck and (wanted is None or SagaStatus.FAILED in wanted):
            # stuck = what SagaOrchestrator.stuck() returns: the unheld active ones, then
            # the FAILED ones waiting for an operator
            failed = await store.find(
                saga_type=saga_type, statuses=[SagaStatus.FAILED], limit=limit
            )
            rows = (rows + failed)[:limit]
    finally:
        await store.close()
    data = [_saga_row(r) for r in rows]
    _emit(
        as_json,
        data,
        lambda: (
            _table(
                f"sagas in {redact_url(db)}",
                ["id", "type", "status", "steps done", "updated", "error"],
                [
                    [
                        d["saga_id"],
                        d["type"],
                        d["status"],
                        ", ".join(d["done"]),
                        d["updated_at"].isoformat(timespec="seconds"),
                        d["error"],
                    ]
                    for d in data
                ],
            )
            if data
            else "no sagas"
        ),
    )


@sagas.command("show")
@db_option
@prefix_option
@schema_option
@click.argument("saga_id")
@json_option
@_run(lambda kw: [kw["db"]])
async def sagas_show(db: str, prefix: str, schema: str | None, saga_id: str, as_json: bool) -> None:
    """One instance: its state, data and history."""
    store = _store("saga", _existing_db(db), prefix, schema)
    try:
        r = await store.get(saga_id)
    finally:
        await store.close()
    data = _saga_row(r)
    raw = r.data.model_dump(mode="json") if hasattr(r.data, "model_dump") else r.data
    data["data"] = raw
    data["history"] = [h._asdict() for h in r.history]

    def show() -> Table:
        t = _table(
            f"saga {r.saga_id} ({r.saga_type}): {r.status}",
            ["at", "event", "step", "attempt", "detail"],
            [
                [h.at.isoformat(timespec="milliseconds"), h.event, h.step, h.attempt, h.detail]
                for h in r.history
            ],
        )
        t.caption = f"data: {json.dumps(raw, default=_jsonable)}" + (
            f"  error: {r.error}" if r.error else ""
        )
        return t

    _emit(as_json, data, show)


async def _operate(app: str, saga_id: str, op: str, reason: str | None) -> Any:
    service = _load_app(app)
    try:
        orchestrator = service.sagas
        if op == "retry":
            rec = await orchestrator.retry(saga_id)
        else:
            rec = await orchestrator.abort(saga_id, reason or "aborted by operator")
        await orchestrator.close()
        return rec
    finally:
        await service.stop()


@sagas.command("retry")
@app_option
@click.argument("saga_id")
@json_option
@_run()
async def sagas_retry(app: str, saga_id: str, as_json: bool) -> None:
    """Resume a FAILED instance (its failed compensations or step start again). Exits 1,
    after printing the instance, if it ends FAILED again."""
    from msdata.saga import SagaStatus

    rec = await _operate(app, saga_id, "retry", None)
    _emit(as_json, _saga_row(rec), lambda: f"saga {saga_id}: {rec.status}")
    if rec.status is SagaStatus.FAILED:
        _fail(f"saga {saga_id} failed again: {rec.error}")


@sagas.command("abort")
@app_option
@click.argument("saga_id")
@click.option("--reason", default=None, help="Recorded in the instance's history.")
@json_option
@_run()
async def sagas_abort(app: str, saga_id: str, reason: str | None, as_json: bool) -> None:
    """Compensate a RUNNING instance that has not passed its pivot."""
    rec = await _operate(app, saga_id, "abort", reason)
    _emit(as_json, _saga_row(rec), lambda: f"saga {saga_id}: {rec.status}")


# -- trace ---------------------------------------------------------------------------------


class _Skipping:
    """An audit source of ``service``'s store, its entries tagged with the service's name. A
    store that has no tables here (a service that keeps no event store, runs no saga) holds
    nothing: it adds nothing and is listed in ``missing``."""

    def __init__(self, source: Any, service: str, label: str, missing: list[str]) -> None:
        self.source, self.service, self.label, self.missing = source, service, label, missing

    async def entries(self, correlation_id: str) -> list[Any]:
        try:
            found = await self.source.entries(correlation_id)
        except SchemaError:
            self.missing.append(self.label)
            return []
        return [dataclasses.replace(e, detail={**e.detail, _SERVICE: self.service}) for e in found]


#: the detail key that carries the entry's service while the trail is put together
_SERVICE = "msdata.service"
_TRACE_PORTS = ("outbox", "eventstore", "saga")


def _trace_sources(name: str, stores: dict[str, Any], missing: list[str]) -> list[_Skipping]:
    from msdata.audit import EventStoreAudit, SagaAudit, outbox_audit

    return [
        _Skipping(outbox_audit(stores["outbox"], name=name), name, f"{name} outbox", missing),
        _Skipping(
            EventStoreAudit(stores["eventstore"], name=f"{name} event store"),
            name,
            f"{name} event store",
            missing,
        ),
        _Skipping(SagaAudit(stores["saga"]), name, f"{name} sagas", missing),
    ]


def _trace_row(entry: Any) -> dict[str, Any]:
    detail = dict(entry.detail)
    return {
        "time": entry.time,
        "service": detail.pop(_SERVICE),
        "kind": entry.kind,
        "type": entry.type,
        "message_id": entry.message_id,
        "causation_id": entry.causation_id,
        "where": entry.where,
        "detail": detail,
    }


@cli.command("trace")
@click.argument("correlation_id")
@click.option(
    "--app",
    "apps",
    multiple=True,
    help="module:attr of a Service whose stores to read (repeatable: one per service).",
)
@click.option(
    "--db",
    "dbs",
    multiple=True,
    help="A service's database URL whose stores to read (repeatable).",
)
@prefix_option
@schema_option
@json_option
@_run(lambda kw: list(kw["dbs"]))
async def trace(
    correlation_id: str,
    apps: tuple[str, ...],
    dbs: tuple[str, ...],
    prefix: str,
    schema: str | None,
    as_json: bool,
) -> None:
    """The audit trail of CORRELATION_ID as a timeline: the messages (outbox rows, pending,
    parked or kept after sending; event-store events) and saga steps that carried it, read
    from the stores of each --app service and each --db database, oldest first."""
    from msdata.audit import audit_trail

    if not apps and not dbs:
        raise click.UsageError("name the stores to read: --app module:service or --db URL")
    missing: list[str] = []
    sources: list[_Skipping] = []
    services: list[Any] = []
    opened: list[Any] = []
    try:
        for spec in apps:
            service = _load_app(spec)
            services.append(service)
            stores = {port: service.store(port) for port in _TRACE_PORTS}
            sources += _trace_sources(service.name, stores, missing)
        for url in dbs:
            name = redact_url(_existing_db(url))
            stores = {}
            for port in _TRACE_PORTS:
                stores[port] = _store(port, url, prefix, schema)
                opened.append(stores[port])
            sources += _trace_sources(name, stores, missing)
        trail = await audit_trail(correlation_id, sources)
    finally:
        for store in opened:
            await store.close()
        for service in services:
            await service.stop()
    labels = [s.label for s in sources]
    # in the order the sources were given (they are read at once: they end in any order)
    missing = [label for label in labels if label in missing]
    read = [label for label in labels if label not in missing]
    if len(missing) == len(labels):
        _fail(
            "none of the stores has its tables ("
            + ", ".join(labels)
            + "): check --prefix/--schema, or create them with: msdata db init URL"
        )
    rows = [_trace_row(e) for e in trail]
    data = {
        "correlation_id": correlation_id,
        "read": read,
        "missing": missing,
        "entries": rows,
    }

    def what(r: dict[str, Any]) -> str:
        if r["kind"] == "saga_step":
            event = r["detail"].get("event", "")
            return f"{event} {r['type']}" if r["type"] else event
        return str(r["type"] or "")

    def show() -> Table | str:
        if not rows:
            return f"nothing carries correlation id {correlation_id} in: " + ", ".join(read)
        t = _table(
            f"trace of {correlation_id}",
            ["time", "service", "kind", "what", "message id", "caused by", "where"],
            [
                [
                    r["time"].isoformat(timespec="milliseconds"),
                    r["service"],
                    r["kind"].replace("_", " "),
                    what(r),
                    r["message_id"],
                    r["causation_id"],
                    r["where"],
                ]
                for r in rows
            ],
        )
        if missing:
            t.caption = "no tables (nothing to read): " + ", ".join(missing)
        return t

    _emit(as_json, data, show)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``msdata`` console script."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="msdata")
    except ConfigurationError as e:  # pragma: no cover - commands catch their own
        _err.print(f"error: {e}", markup=False)
        sys.exit(FAILED)


if __name__ == "__main__":
    main()
