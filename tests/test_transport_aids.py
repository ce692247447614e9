"""The policy and the aids every transport adapter shares: the dead-letter rule and its
headers (msdata.deadletter), and the driver-error translation (msdata.transport.DriverErrors)."""

from __future__ import annotations

import pytest

from msdata import deadletter
from msdata.errors import ConfigurationError, PublishError, TransportError
from msdata.transport import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    DriverErrors,
    TransportMessage,
)


class DriverFailure(Exception):
    pass


def test_the_nth_failure_is_the_last_and_more_deliveries_are_overdue() -> None:
    assert [deadletter.exhausted(a, 3) for a in (1, 2, 3, 4)] == [False, False, True, True]
    assert deadletter.overdue_reason(3, 3) is None
    reason = deadletter.overdue_reason(4, 3)
    assert reason is not None and "handed out 3 times and never settled" in reason
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
