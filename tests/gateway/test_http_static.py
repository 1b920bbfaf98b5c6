"""Static files on the public port (gateway/static_files.py): odd paths answer 404
without a traceback (issue 10 item 5), and every file carries the security headers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.static_files import CONTENT_SECURITY_POLICY, static_response
from tests.fixtures.servers import GatewayHandle

ODD_PATHS = [
    "/static/" + "a" * 300,          # ENAMETOOLONG on the filesystem: was a 500
    "/static/" + "a" * 4000,
    "/static/../server.py",
    "/static/..%2f..%2fetc%2fpasswd",
    "/static/.hidden",
    "/static/dashboard.js/x",
    "/static/a%00b",
    "/static/",
    "/static/__init__.py",
]


async def raw_get(gw: GatewayHandle, path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET on a raw socket (no client library normalises the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("path", ODD_PATHS, ids=range(len(ODD_PATHS)))
async def test_odd_static_paths_are_404_without_a_traceback(
        gateway: GatewayHandle, path: str, caplog: pytest.LogCaptureFixture) -> None:
    canary = await gateway.client("canary")
    with caplog.at_level(logging.DEBUG):
        status, _, _ = await raw_get(gateway, path)
        assert (await canary.ping())["t"] == "pong"
    assert status == 404
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


def test_static_response_never_raises() -> None:
    for path in [*ODD_PATHS, "/static/\x00", "/static/" + "é" * 200, "", "/", "//"]:
        response = static_response(path)
        assert response is None or response.status_code == 200


@pytest.mark.parametrize("path", ["/dashboard", "/", "/client.js", "/static/dashboard.js",
                                  "/static/dashboard.css", "/static/dashboard.html"])
async def test_files_carry_the_security_headers(gateway: GatewayHandle, path: str) -> None:
    status, headers, body = await raw_get(gateway, path)
    assert status == 200 and body
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Length"] == str(len(body))
    if path.endswith(".js"):
        assert headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_policy_allows_only_own_scripts_and_styles() -> None:
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    # The WebSocket and the admin API may be on another port or host.
    assert {"ws:", "wss:", "http:", "https:"} <= set(directives["connect-src"].split())
