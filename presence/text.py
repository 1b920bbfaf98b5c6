"""Validation of text that clients send: what every path accepting a string checks.

Two rules, both raising :class:`BadRequest` that names the field:

* :func:`check_text` (free text: a meta's ``device`` and ``note``): the string must be
  encodable as UTF-8. Python strings may hold lone surrogates (``"\\ud800x"``, which the
  standard ``json`` module decodes from ``"\\ud800x"`` escapes); neither orjson nor
  msgpack can encode them, so a stored string of that kind would break every later
  reply or publication that carries it.
* :func:`check_identifier` (user ids, supplier ids, model and factor names, the
  token's ``sub``): encodable as above, and free of control characters (Unicode
  category ``Cc``: U+0000..U+001F, U+007F..U+009F). Identifiers end up in logs,
  dashboards and exports, where a newline or an escape sequence forges lines or
  terminal output.

Lengths and character sets stay with the callers (they differ per field); these
functions only add what every text field shares. Both return the string unchanged.
"""

from __future__ import annotations

import re

from presence.errors import BadRequest

__all__ = ["check_identifier", "check_text", "has_control", "is_encodable"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_encodable(value: str) -> bool:
    """True when ``value`` encodes as UTF-8 (it holds no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_control(value: str) -> bool:
    """True when ``value`` holds a control character (Unicode category Cc)."""
    return _CONTROL.search(value) is not None


def check_text(value: str, field: str) -> str:
    """``value`` if it encodes as UTF-8, else :class:`BadRequest` naming ``field``."""
    if not is_encodable(value):
        raise BadRequest(f"{field} is not valid Unicode text (lone surrogate)", field=field)
    return value


def check_identifier(value: str, field: str) -> str:
    """``value`` if it encodes as UTF-8 and holds no control character, else
    :class:`BadRequest` naming ``field``."""
    check_text(value, field)
    if has_control(value):
        raise BadRequest(f"{field} must not contain control characters", field=field)
    return value
