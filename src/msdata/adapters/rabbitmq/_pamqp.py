"""pamqp reads AMQP short strings that are not UTF-8 instead of failing on them.

Why: AMQP 0-9-1 short strings (the ``message_id``, ``content_type`` and the other string
properties of a message, a headers table's field names) are bytes on the wire; any producer
may put bytes there that are not UTF-8. pamqp 4 decodes them strictly, so such a message's
content-header frame raises (``Could not unmarshal ContentHeader frame``), aiormq closes the
whole connection, the robust connection reconnects, the broker delivers the same message
again, and the consumer loops on it for good: nothing behind it is handled, and publishes on
that connection fail (issue 9).

:func:`install` makes pamqp's decoder read a short string, and a field table's names, with
``errors="surrogateescape"``: valid UTF-8 decodes exactly as before, and other bytes become
lone surrogates (``\\udcff`` for byte 0xff), so the frame is read and the message delivered.
The RabbitMQ transport then escapes them (:func:`msdata.transport.carryable_text`) before
any of it is handed out or sent again. It changes pamqp for the whole process (it is how
aiormq parses every frame); what it changes is only what used to fail.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import common, decode

__all__ = ["install"]

_installed = False


def _short_str(value: bytes) -> tuple[int, str]:
    """pamqp's ``decode.short_str``, with bytes that are not UTF-8 as lone surrogates."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err


def _field_table(value: bytes) -> tuple[int, Any]:
    """pamqp's ``decode.field_table``, with field names that are not UTF-8 as lone
    surrogates (values are pamqp's own: a long string that is not UTF-8 stays bytes)."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data = {}
        field_table_end = offset + length
        if field_table_end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < field_table_end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > field_table_end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return field_table_end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install() -> None:
    """Make pamqp's decoder tolerant (idempotent): see the module docstring."""
    global _installed
    if _installed:
        return
    decode.short_str = _short_str
    decode.field_table = _field_table
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["table"] = _field_table
    decode.TABLE_MAPPING[b"F"] = _field_table
    _installed = True
