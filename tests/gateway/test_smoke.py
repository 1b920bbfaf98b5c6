from tests.fixtures.servers import GatewayHandle


async def test_two_clients_see_each_other(gateway: GatewayHandle) -> None:
    a = await gateway.client("u1")
    b = await gateway.client("u2", fmt="msgpack")
    await a.join("team:w1")
    await b.join("team:w1")
    event = await a.next_event(2)
    assert list(event["joins"]) == ["u2"]
