"""Token claims that could poison state are refused (gateway/auth.py, issue 10)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets

import pytest

from gateway.auth import Authenticator, mint_token
from presence.errors import Unauthorized
from presence.settings import Settings

SECRET = secrets.token_urlsafe(32)
AUTH = Authenticator(Settings.of(jwt_secret=SECRET))


@pytest.mark.parametrize("sub", ["u1\n", "u\x00", "\x1b[2Jroot", "u\x7f", "u\x9b1"])
def test_sub_with_control_characters_is_unauthorized(sub: str) -> None:
    with pytest.raises(Unauthorized) as info:
        AUTH.verify(mint_token(SECRET, sub))
    assert "control" in info.value.message
    assert sub not in info.value.message


def test_sub_with_a_lone_surrogate_is_unauthorized() -> None:
    # PyJWT cannot even sign it: build the payload as a client could, with a JSON escape.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    payload = b64(json.dumps({"sub": "\ud800x", "exp": 2**40}).encode())
    signing = header + b"." + payload
    sig = b64(hmac.new(SECRET.encode(), signing, hashlib.sha256).digest())
    with pytest.raises(Unauthorized):
        AUTH.verify((signing + b"." + sig).decode())


@pytest.mark.parametrize("token", ["\ud800", "a.b.\udfff", "é"])
def test_token_that_is_not_ascii_is_unauthorized_not_a_crash(token: str) -> None:
    with pytest.raises(Unauthorized):
        AUTH.verify(token)


def test_ordinary_subs_still_pass() -> None:
    for sub in ("u1", "Zoë Müller", "用户-7", "a" * 128):
        assert AUTH.verify(mint_token(SECRET, sub)).user == sub
