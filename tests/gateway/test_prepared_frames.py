"""Prepared frames (gateway/transport.py): the bytes serialized once per flush are the
bytes websockets itself would write on each server connection, and they go only where
``websockets.broadcast`` would write."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway.transport import prepare
from tests.fixtures.servers import GatewayFactory


def sent_by_websockets(data: str | bytes) -> bytes:
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    if isinstance(data, str):
        protocol.send_text(data.encode())
    else:
        protocol.send_binary(data)
    return b"".join(protocol.data_to_send())


@given(st.one_of(st.text(max_size=70_000), st.binary(max_size=70_000)))
def test_prepared_bytes_are_what_websockets_writes(data: str | bytes) -> None:
    assert prepare(data) == sent_by_websockets(data)


async def test_members_get_prepared_diffs_and_closing_ones_are_skipped(
        gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    watchers = [await gw.client(f"w{i}", fmt) for i, fmt in enumerate(["json", "msgpack"] * 3)]
    for w in watchers:
        await w.join("team:fan")
    writer = await gw.client("writer")
    await writer.join("team:fan")
    for w in watchers:
        await w.wait_for(lambda e: "writer" in e["joins"])
    closing = watchers.pop()
    await closing.ws.close()  # its state is no longer OPEN: skipped, no error
    await writer.update(note="to all")
    for w in watchers:
        diff = await w.wait_for(lambda e: "writer" in e["joins"])
        assert diff["joins"]["writer"][0]["note"] == "to all"
