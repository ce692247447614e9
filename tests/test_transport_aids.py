"""The policy and the aids every transport adapter shares: the dead-letter rule and its
headers (msdata.deadletter), and the driver-error translation (msdata.transport.DriverErrors)."""

from __future__ import annotations

import logging

import pytest

from msdata import deadletter
from msdata.errors import ConfigurationError, InvalidHeader, PublishError, TransportError
from msdata.transport import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    DriverErrors,
    ThrottledLog,
    TransportMessage,
    carryable_headers,
    check_message,
    pop_url_options,
)


class DriverFailure(Exception):
    pass


def test_the_nth_failure_is_the_last_and_more_deliveries_are_overdue() -> None:
    assert [deadletter.exhausted(a, 3) for a in (1, 2, 3, 4)] == [False, False, True, True]
    assert deadletter.overdue_reason(3, 3) is None
    reason = deadletter.overdue_reason(4, 3)
    assert reason == (
        "handed out 3 times and never settled "
        "(each time its consumer died or lost it before settling; max_attempts=3)"
    )
    # stopping consumers never count, so the reason does not blame them; one time, not "times"
    one = deadletter.overdue_reason(2, 1)
    assert one is not None and one.startswith("handed out 1 time and never settled (")
    assert deadletter.overdue_attempts(4) == 3
    assert deadletter.failed_reason(3, None) == "failed 3 attempts"
    assert deadletter.failed_reason(1, None) == "failed 1 attempt"
    assert deadletter.failed_reason(3, "boom") == "boom"


def test_a_dead_letter_carries_the_message_and_the_four_headers() -> None:
    m = TransportMessage("id-1", b"{}", "k", {"traceparent": "00-x"})
    letter = deadletter.dead_letter(m, "orders", "billing", 5, "ValueError: bad\n  line two")
    assert letter.topic == "orders.billing.dlq"
    assert (letter.message.id, letter.message.body, letter.message.key) == ("id-1", b"{}", "k")
    assert dict(letter.message.headers) == {
        "traceparent": "00-x",
        DEAD_LETTER_REASON: "ValueError: bad line two",
        DEAD_LETTER_TOPIC: "orders",
        DEAD_LETTER_GROUP: "billing",
        DEAD_LETTER_ATTEMPTS: "5",
    }
    assert deadletter.dead_letter(m, "t", "g", 1, " \n").reason == "dead-lettered"


def test_driver_errors_become_the_given_msdata_error_and_others_pass() -> None:
    expected = pytest.raises(PublishError, match="publish to 'x': DriverFailure: down")
    with expected as caught, DriverErrors(DriverFailure, "publish to 'x'", PublishError):
        raise DriverFailure("down")
    assert isinstance(caught.value.__cause__, DriverFailure)
    with pytest.raises(TransportError), DriverErrors((OSError, DriverFailure), "read"):
        raise OSError("reset")
    with pytest.raises(KeyError), DriverErrors(DriverFailure, "read"):
        raise KeyError("not a driver error")
    # msdata's own errors pass unchanged even when the driver class is Exception
    with pytest.raises(ConfigurationError), DriverErrors(Exception, "declare"):
        raise ConfigurationError("bad")
    with DriverErrors(DriverFailure, "nothing"):
        pass


def test_check_message_refuses_what_no_broker_carries_and_dead_letters_stay_carryable() -> None:
    import pytest

    from msdata import deadletter
    from msdata.errors import EncodeError, InvalidHeader
    from msdata.transport import TransportMessage, check_message

    ok = TransportMessage("id-1", b"{}", "k", {"traceparent": "00-ab", "X-Custom.1": "é v"})
    check_message(ok)
    for headers in [{"x": 1}, {"has space": "v"}, {"a:b": "v"}, {"": "v"}, {"x": "a\nb"}]:
        with pytest.raises(InvalidHeader):
            check_message(TransportMessage("id", b"{}", None, headers))  # type: ignore[arg-type]
    with pytest.raises(InvalidHeader):
        check_message(TransportMessage("id", b"{}", "k\r\n"))
    with pytest.raises(InvalidHeader):
        check_message(TransportMessage("id", b"{}", None, {"x": "\ud800"}))
    for bad_id in ["", "x\ud800", 7, "a\r\nX-Evil: 1", "a\x00"]:
        with pytest.raises(EncodeError):
            check_message(TransportMessage(bad_id, b"{}"))  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        check_message(TransportMessage("id", "text"))  # type: ignore[arg-type]
    # a foreign message's headers as another broker gave them: its dead letter is carryable
    foreign = TransportMessage(
        "x\ud800",
        b"?",
        "k\n1",
        {"has space": "v", "n": 5, "ok": "a\r\nb"},  # type: ignore[dict-item]
    )
    letter = deadletter.dead_letter(foreign, "t", "g", 1, "bad")
    check_message(letter.message)
    # an id with a line break (a foreign entry's field) is carried on escaped, not refused
    crlf = TransportMessage("a\r\nX-Evil: 1", b"?")
    check_message(deadletter.dead_letter(crlf, "t", "g", 1, "bad").message)
    assert letter.message.headers["ok"] == "a  b" and letter.message.headers["n"] == "5"
    assert "has space" not in letter.message.headers


def test_screen_sends_the_rest_and_url_options_are_taken_out() -> None:
    import pytest

    from msdata.errors import ConfigurationError, MessageTooLarge
    from msdata.transport import (
        TransportMessage,
        message_size,
        pop_url_options,
        refused_error,
        screen,
    )

    a, b = TransportMessage("a", b"x" * 10), TransportMessage("b", b"x" * 100)
    kept, refused = screen([a, b], 50)
    assert kept == [a] and isinstance(refused["b"], MessageTooLarge)
    assert message_size(b) == 101
    batch = [a]
    assert screen(batch, 50)[0] is batch  # nothing refused: the batch itself
    error = refused_error("publish to 't'", 2, refused)
    assert error.refused == {"b": f"MessageTooLarge: {refused['b']}"}
    assert error.__cause__ is refused["b"]
    url, found = pop_url_options(
        "redis://u:p@h:6379/0?max_message_bytes=10&db=2&max_held_bytes=20#f",
        ("max_message_bytes", "max_held_bytes"),
    )
    assert url == "redis://u:p@h:6379/0?db=2#f" and found == {
        "max_message_bytes": 10,
        "max_held_bytes": 20,
    }
    assert pop_url_options("memory://", ("max_held_bytes",)) == ("memory://", {})
    with pytest.raises(ConfigurationError):
        pop_url_options("memory://?max_held_bytes=0", ("max_held_bytes",))


def test_logging_the_dead_letter_of_deeply_nested_json_does_not_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log line looks up the CloudEvents type of the body; JSON nested too deep for the
    parser (RecursionError) just has no type: the dead letter is logged, nothing raises."""
    body = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    dead = deadletter.dead_letter(TransportMessage("deep", body), "t", "g", 1, "malformed")
    with caplog.at_level(logging.WARNING, logger="msdata.deadletter"):
        dead.log()
    (record,) = [r for r in caplog.records if r.name == "msdata.deadletter"]
    assert record.levelno == logging.WARNING and "type unknown" in record.getMessage()


@pytest.mark.parametrize(
    "query",
    [
        "max_message_bytes=1_000",
        "max_message_bytes=%20100",
        "max_message_bytes=+100",
        "max_message_bytes=\u0661\u0662\u0663",  # Arabic-Indic digits: str.isdigit() is True
        "max_message_bytes=0",
        "max_message_bytes=",
        "max_message_bytes=1&max_message_bytes=2",
        "max_mesage_bytes=100",
        "MAX_MESSAGE_BYTES=100",
    ],
)
def test_url_options_are_refused_unless_exactly_right(query: str) -> None:
    """One parser of every transport's URL options: ASCII digits only, each option once,
    and a max_* option the transport does not know is refused by name."""
    with pytest.raises(ConfigurationError):
        pop_url_options(f"x://h/?{query}", ("max_message_bytes", "max_held_bytes"))


def test_url_options_leave_the_drivers_own_parameters() -> None:
    url, found = pop_url_options(
        "redis://h/0?max_connections=5&max_message_bytes=4096&socket_timeout=1",
        ("max_message_bytes", "max_held_bytes"),
        driver=("max_connections",),
    )
    assert url == "redis://h/0?max_connections=5&socket_timeout=1"
    assert found == {"max_message_bytes": 4096}


@pytest.mark.parametrize("name", ["Nats-Expected-Stream", "nats-ttl", "NATS-Msg-Id"])
def test_header_names_jetstream_acts_on_are_refused_and_dropped_from_copies(name: str) -> None:
    """Nats-* headers change how JetStream stores a message: check_message refuses them on
    every transport, and a dead letter of a foreign message does not carry them on."""
    with pytest.raises(InvalidHeader, match="Nats-"):
        check_message(TransportMessage("m", b"{}", None, {name: "x"}))
    assert carryable_headers({name: "x", "x-h": "y"}) == {"x-h": "y"}


def test_several_urls_may_each_carry_an_option_with_one_value() -> None:
    names = ("max_message_bytes", "max_held_bytes")
    url, found = pop_url_options("n://a?max_held_bytes=9,n://b?max_held_bytes=9", names)
    assert (url, found) == ("n://a,n://b", {"max_held_bytes": 9})
    with pytest.raises(ConfigurationError, match="differs"):
        pop_url_options("n://a?max_held_bytes=9,n://b?max_held_bytes=8", names)


@pytest.mark.parametrize(
    "url",
    [
        "memory://?namespace=shop",
        "redis://127.0.0.1:6379/0?namespace=shop&socket_timeout=1",
        "amqp://guest:guest@127.0.0.1:5672/?namespace=shop",
        "nats://127.0.0.1:4222?namespace=shop",
    ],
)
def test_every_transport_takes_its_namespace_from_the_url(url: str) -> None:
    """``namespace`` is one of msdata's URL options on every transport (redis-py used to get
    it and fail with a TypeError): taken out of the URL, given to the constructor, and
    refused when given both ways on Redis, or empty, or twice."""
    from msdata.urls import transport_from_url

    transport = transport_from_url(url)
    assert transport.namespace == "shop"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="namespace"):
        transport_from_url(url.replace("namespace=shop", "namespace=shop&namespace=b"))
    with pytest.raises(ConfigurationError, match="namespace"):
        transport_from_url(url.replace("namespace=shop", "namespace="))
    with pytest.raises(ConfigurationError):
        transport_from_url(url.replace("namespace=shop", "namespace=no%20spaces"))
    for typo in ("Namespace", "NAMESPACE", "namespce", "name-space"):  # never run un-namespaced
        with pytest.raises(ConfigurationError, match="unknown URL option"):
            transport_from_url(url.replace("namespace=shop", f"{typo}=shop"))


@pytest.mark.parametrize("url", ["memory://?foo=1", "nats://127.0.0.1:4222?timeout=5"])
def test_a_transport_whose_driver_takes_no_url_options_refuses_every_other(url: str) -> None:
    from msdata.urls import transport_from_url

    with pytest.raises(ConfigurationError, match="unknown URL option"):
        transport_from_url(url)


def test_a_namespace_in_several_urls_is_decoded_and_must_agree() -> None:
    names = ("max_message_bytes",)
    url, found = pop_url_options(
        "n://a?namespace=s%2D1,n://b?namespace=s-1", names, text=("namespace",)
    )
    assert (url, found) == ("n://a,n://b", {"namespace": "s-1"})
    with pytest.raises(ConfigurationError, match="differs"):
        pop_url_options("n://a?namespace=x,n://b?namespace=y", names, text=("namespace",))


def test_a_throttled_log_keeps_one_line_per_kind_per_period_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    throttled = ThrottledLog(logging.getLogger("msdata.test.throttle"), 10.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="msdata.test.throttle"):
        for i in range(50):
            now[0] = 100.0 + i * 0.1  # every 0.1 s for 5 s
            throttled.warning("down", "server %s down", "a")
        throttled.warning("other", "another kind")
        now[0] = 110.0
        assert throttled.warning("down", "server %s down", "a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "server a down",
        "another kind",
        "server a down (49 more like it in the last 10s)",
    ]


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/abc",
        "redis://127.0.0.1:6379/0/1",
        "nats://127.0.0.1:4222/abc",
        "nats://127.0.0.1:4222,nats://127.0.0.1:4223/x",
    ],
)
def test_a_url_path_the_transport_would_ignore_is_refused(url: str) -> None:
    """A Redis database that is no number (read as database 0) and any path on NATS (where
    nothing reads it): refused when built, not ignored."""
    from msdata.urls import transport_from_url

    with pytest.raises(ConfigurationError, match=r"path|number"):
        transport_from_url(url)


def test_nats_refuses_a_max_message_bytes_the_dead_letter_reserve_leaves_no_room_in() -> None:
    """``max_message_bytes`` less the dead-letter reserve is the largest message NATS
    publishes: a value not over the reserve refused every message ("over the limit of 1
    bytes"); refused when built, saying the minimum."""
    from msdata.urls import transport_from_url

    least = deadletter.DEAD_LETTER_RESERVE + 1
    for bad in (100, deadletter.DEAD_LETTER_RESERVE):
        with pytest.raises(ConfigurationError, match=f"at least {least}"):
            transport_from_url(f"nats://127.0.0.1:4222?max_message_bytes={bad}")
    assert transport_from_url(f"nats://127.0.0.1:4222?max_message_bytes={least}")
