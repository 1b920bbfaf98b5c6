"""Static files on the public port: ``/client.js``, ``/dashboard`` and ``/static/<name>``.

Only the files present in gateway/static when the process starts are served, looked
up by name in that set, so a request path never reaches the filesystem: a long or odd
name (``/static/`` + 300 characters, ``..``, a NUL) is a plain 404, never an OSError.
Contents are read at each request (edits show up without a restart).

Every answer carries :data:`SECURITY_HEADERS`. The Content-Security-Policy allows
scripts and styles from the page's own origin only (no inline ``<script>``, no
``style=""`` attribute, no ``eval``). ``connect-src`` names schemes rather than
hosts: the dashboard opens its WebSocket on the public port and, when configured,
calls the admin API on another port of this host or of another host, both chosen by
the operator at run time, so no fixed host list can name them. The page cannot be
framed (``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``), and browsers must
not guess content types (``X-Content-Type-Options: nosniff``).
"""

from __future__ import annotations

import mimetypes
import re
from http import HTTPStatus
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "STATIC_DIR", "static_response"]

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    # The WebSocket and the admin API: another port or host, chosen at run time.
    "connect-src 'self' ws: wss: http: https:",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ALIASES = {"/client.js": "client.js", "/dashboard": "dashboard.html",
            "/dashboard/": "dashboard.html", "/": "dashboard.html"}


def _servable() -> frozenset[str]:
    """Names of the regular files directly in :data:`STATIC_DIR` (no dot files)."""
    if not STATIC_DIR.is_dir():
        return frozenset()
    return frozenset(p.name for p in STATIC_DIR.iterdir()
                     if p.is_file() and _NAME.fullmatch(p.name))


_FILES = _servable()


def _content_type(name: str) -> str:
    if name.endswith(".js"):
        return "text/javascript; charset=utf-8"
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{ctype}; charset=utf-8" if ctype.startswith("text") else ctype


def static_response(path: str) -> Response | None:
    """The 200 response for a static file path (``/client.js``, ``/dashboard``,
    ``/static/<name>``), or None (the caller answers 404) for any other path, including
    names that are not a file of gateway/static. Never raises for any ``path``."""
    name = _ALIASES.get(path)
    if name is None and path.startswith("/static/"):
        name = path[len("/static/"):]
    if name is None or name not in _FILES:
        return None
    try:
        body = (STATIC_DIR / name).read_bytes()
    except OSError:  # removed since start-up: as if it never was
        return None
    headers = Headers([
        ("Content-Type", _content_type(name)),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
        *SECURITY_HEADERS,
    ])
    return Response(HTTPStatus.OK.value, "OK", headers, body)
