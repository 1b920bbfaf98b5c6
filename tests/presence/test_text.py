"""presence/text.py: the checks shared by every path that accepts client text."""

from __future__ import annotations

import msgpack
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from presence.errors import BadRequest
from presence.text import check_identifier, check_text, has_control, is_encodable

CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))]
# Hypothesis leaves surrogates out of text by default: ask for them, and for controls.
CHARS = st.characters(categories=["Cs"]) | st.sampled_from(CONTROLS) | st.characters()
TEXT = st.lists(CHARS, max_size=20).map("".join)


@pytest.mark.parametrize("value", ["\ud800", "\ud800x", "x\udfff", "a\udc80b"])
def test_lone_surrogates_are_refused_naming_the_field(value: str) -> None:
    for check in (check_text, check_identifier):
        with pytest.raises(BadRequest) as info:
            check(value, "scores[2].supplier")
        assert info.value.field == "scores[2].supplier"
        assert info.value.code == "bad_request"


@pytest.mark.parametrize("value", ["", "s1", "At the venue", "😀 é ß 中", "\U0010ffff"])
def test_good_text_is_returned_unchanged(value: str) -> None:
    assert check_text(value, "note") is value
    assert check_identifier(value, "users") is value


@pytest.mark.parametrize("ch", CONTROLS)
def test_control_characters_are_refused_in_identifiers_only(ch: str) -> None:
    value = f"u{ch}1"
    assert check_text(value, "note") == value  # free text may hold a newline
    with pytest.raises(BadRequest) as info:
        check_identifier(value, "users")
    assert info.value.field == "users"


@given(TEXT)
def test_validator_agrees_with_the_encoders(value: str) -> None:
    """Whatever passes can be encoded by both wire formats; whatever fails cannot."""
    try:
        check_text(value, "f")
    except BadRequest as exc:
        assert exc.field == "f"
        assert not is_encodable(value)
        with pytest.raises((TypeError, UnicodeEncodeError, orjson.JSONEncodeError)):
            orjson.dumps(value)
        with pytest.raises((TypeError, UnicodeEncodeError, ValueError)):
            msgpack.packb(value)
        return
    assert orjson.loads(orjson.dumps(value)) == value
    assert msgpack.unpackb(msgpack.packb(value)) == value


@given(TEXT)
def test_identifier_check_is_text_check_plus_no_control(value: str) -> None:
    try:
        check_identifier(value, "sub")
    except BadRequest as exc:
        assert exc.field == "sub"
        assert not is_encodable(value) or has_control(value)
        return
    assert is_encodable(value)
    assert not any(ch in value for ch in CONTROLS)
