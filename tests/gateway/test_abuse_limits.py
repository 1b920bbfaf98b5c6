"""The limits issue 10 asked to decide and write down (docs/operations.md, "Abuse
limits"): unauthenticated sockets count toward ``max_connections``, the connection cap
leaves file descriptors for the rest of the process, a ``sub`` with control characters
is refused over the wire, and every public-port answer carries the security headers."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.auth import mint_token
from gateway.client import PresenceClient
from gateway.server import FD_RESERVE, connection_cap
from gateway.static_files import SECURITY_HEADERS
from tests.fixtures.processes import GatewayProcess, new_secret
from tests.fixtures.servers import GatewayFactory, GatewayHandle
from tests.gateway.test_http_static import raw_get


async def test_unauthenticated_sockets_count_toward_max_connections(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_connections=3, auth_timeout=30.0)
    server = gw.gateway.server
    assert server is not None
    canary = await gw.client("canary")
    # Two sockets that never send hello take the two remaining places.
    known = set(server.handler_tasks)
    silent = [await connect(gw.ws_url, compression=None, open_timeout=5)]
    first = server.handler_tasks - known  # done once that socket's handler has ended
    silent.append(await connect(gw.ws_url, compression=None, open_timeout=5))
    with pytest.raises(ConnectionClosed) as info:
        await PresenceClient.connect(gw.ws_url, gw.token("late"), timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1013
    assert (await canary.ping())["t"] == "pong"
    # A place freed by a silent socket is a place again.
    await silent[0].close()
    await asyncio.wait_for(asyncio.gather(*first, return_exceptions=True), 5)
    newcomer = await PresenceClient.connect(gw.ws_url, gw.token("next"), timeout=5)
    assert newcomer.welcome["t"] == "welcome"
    await newcomer.close()
    await silent[1].close()


@pytest.mark.parametrize(("max_connections", "nofile", "cap"), [
    (20_000, 20_000, 20_000 - FD_RESERVE),     # the default limit cannot hold them all
    (20_000, 1_048_576, 20_000),
    (100, 256, 1),                             # never 0 or negative
    (20_000, -1, 20_000),                      # unlimited
    (20_000, resource.RLIM_INFINITY, 20_000),
])
def test_connection_cap(max_connections: int, nofile: int, cap: int) -> None:
    assert connection_cap(max_connections, nofile) == cap


def test_fd_limit_is_raised_to_the_hard_limit_at_start() -> None:
    code = (
        "import resource, json\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from gateway.cli import raise_fd_limit\n"
        "print(json.dumps([raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    (before, after, hard), (soft_now, hard_now) = json.loads(out)
    assert before == min(256, hard)
    assert after == soft_now == hard == hard_now


async def test_a_gateway_process_logs_its_fd_limit_and_cap() -> None:
    gw = GatewayProcess("fd1", new_secret(), {"PRESENCE_LOG_LEVEL": "info",
                                              "PRESENCE_MAX_CONNECTIONS": "1000000"})
    await gw.start()
    try:
        log = "".join(gw.log)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert "fd_limit" in log
        if hard != resource.RLIM_INFINITY and hard - FD_RESERVE < 1_000_000:
            assert "connection_cap_lowered" in log
    finally:
        await gw.stop()


@pytest.mark.parametrize("sub", ["u1\n", "\x1b[2Jroot", "u\x00", "u\x9b1"])
async def test_a_sub_with_control_characters_is_closed_4001(
        gateway: GatewayHandle, sub: str) -> None:
    canary = await gateway.client("canary")
    token = mint_token(gateway.secret, sub, ["*"])
    with pytest.raises(ConnectionClosed) as info:
        await PresenceClient.connect(gateway.ws_url, token, timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001
    assert "control" in info.value.rcvd.reason
    assert (await canary.ping())["t"] == "pong"
    assert sub not in {s.user for s in gateway.node.sessions}


@pytest.mark.parametrize(("path", "status"), [
    ("/healthz", 200), ("/nothing-here", 404), ("/ws", 426), ("/dashboard", 200),
])
async def test_every_public_port_answer_carries_the_security_headers(
        gateway: GatewayHandle, path: str, status: int) -> None:
    got, headers, _ = await raw_get(gateway, path)
    assert got == status
    for name, value in SECURITY_HEADERS:
        assert headers.get(name) == value, name
