"""Reasons and headers msdata writes are always encodable (escaped, length-capped), and ids
are checked before any store sees them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msdata import CloudEventsCodec, Event, MessageRegistry, make_envelope
from msdata.adapters.memory import MemoryInboxStore
from msdata.adapters.sqlite import SqliteInboxStore
from msdata.deadletter import dead_letter
from msdata.errors import EncodeError, MalformedMessage
from msdata.messages import SAFE_TEXT_LIMIT, message_type, safe_text
from msdata.outbox import Inbox
from msdata.transport import DEAD_LETTER_REASON, TransportMessage


@given(st.text(), st.integers(3, 3000))
def test_safe_text_is_one_line_of_utf8_within_the_limit(text: str, limit: int) -> None:
    out = safe_text(text, limit)
    assert len(out.encode("utf-8")) <= limit  # encodes: no lone surrogate left
    assert out.isprintable() or not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    if text.isascii() and text.isprintable() and len(text) <= limit:
        assert out == text  # nothing to do: unchanged


def test_safe_text_escapes_readably_and_marks_a_cut() -> None:
    assert safe_text("id 'a\ud800'\nnext\x00") == "id 'a\\ud800'\\nnext\\x00"
    # text that reorders how the rest is shown, or breaks the line, is escaped too
    assert safe_text("id\u202egnp.exe\u2066x\u2028y") == "id\\u202egnp.exe\\u2066x\\u2028y"
    assert safe_text("é ü 中文 €") == "é ü 中文 €"  # other non-ASCII text stays as it is
    assert safe_text("é" * 600, 10) == "ééé..."
    assert len(safe_text("x" * 5000).encode()) == SAFE_TEXT_LIMIT


def test_a_dead_letter_reason_is_always_encodable() -> None:
    hostile = "MessageValidationError: id 'x\udc00' " + "\x1b[31m" + "y" * 10_000 + "\r\n"
    letter = dead_letter(TransportMessage("m-1", b"{}"), "orders", "billing", 3, hostile)
    reason = letter.message.headers[DEAD_LETTER_REASON]
    assert reason == letter.reason
    assert len(reason.encode("utf-8")) <= SAFE_TEXT_LIMIT
    assert reason.startswith("MessageValidationError: id 'x\\udc00' \\x1b[31myyy")
    assert reason.endswith("...")


registry = MessageRegistry()


@message_type("safe.Ping", registry=registry)
class Ping(Event):
    n: int = 0


def test_a_surrogate_id_from_the_wire_never_reaches_a_store() -> None:
    codec = CloudEventsCodec(registry)
    raw = codec.encode(make_envelope(Ping(), registry=registry))
    start = raw.index(b'"id":"') + 6
    forged = raw[:start] + b"\\ud800" + raw[start:]
    with pytest.raises(MalformedMessage, match="lone surrogate") as info:
        codec.decode(forged)
    info.value.args[0].encode("utf-8")  # the dead-letter reason it becomes encodes


@pytest.mark.parametrize("message_id", ["a\ud800", "\udfff", "", 42])
async def test_the_inbox_refuses_an_id_no_store_can_write(
    tmp_path: Path, message_id: object
) -> None:
    store = SqliteInboxStore(str(tmp_path / "inbox.db"))
    await store.create_schema()
    conn = sqlite3.connect(str(tmp_path / "inbox.db"), isolation_level=None)
    try:
        conn.execute("BEGIN")
        with pytest.raises(EncodeError):
            Inbox(store).first_time(conn, "billing", message_id)  # type: ignore[arg-type]
        with pytest.raises(EncodeError):
            await Inbox(store).first_time_async(conn, "billing", message_id)  # type: ignore[arg-type]
        assert Inbox(store).first_time(conn, "billing", "ok-\U0001f600")
        conn.execute("ROLLBACK")
    finally:
        conn.close()
        await store.close()
    memory = MemoryInboxStore()
    with pytest.raises(EncodeError):
        Inbox(memory).first_time(memory.begin(), "billing", message_id)  # type: ignore[arg-type]


def test_a_stream_id_no_store_can_write_is_refused() -> None:
    from msdata.eventstore.store import check_stream_id

    assert check_stream_id("order-\U0001f600") == "order-\U0001f600"
    with pytest.raises(EncodeError, match="lone surrogate"):
        check_stream_id("order-\ud800")
