"""Clients cannot choose metric label values (issue 10 item 6).

The close code a client sends used to become a label of ``presence_closes_total`` as
is, before authentication: about 2,000 possible series from codes 1000-4999.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.registry import CollectorRegistry
from websockets.asyncio.client import connect

from gateway.metrics import KNOWN_CLOSE_CODES, Metrics, close_label
from tests.fixtures.servers import GatewayHandle

ALLOWED_CLOSE_LABELS = {str(c) for c in KNOWN_CLOSE_CODES} | {"other", "none"}


def label_values(registry: CollectorRegistry, metric: str, label: str) -> dict[str, float]:
    """``{label value: sample value}`` of one counter, from the rendered registry."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == metric and label in sample.labels:
                out[sample.labels[label]] = sample.value
    return out


def test_count_close_labels_known_codes_by_number_and_the_rest_as_other() -> None:
    m = Metrics()
    for code in (1000, 1001, 1006, 1008, 1009, 1011, 1012, 1013, 4000, 4001):
        m.count_close(code)
    m.count_close(None)
    for code in range(1000, 5000):  # every code a client can put in a close frame
        m.count_close(code)
    counts = label_values(m.registry, "presence_closes_total", "code")
    assert set(counts) == ALLOWED_CLOSE_LABELS
    assert counts["none"] == 1
    assert counts["1000"] == 2 and counts["4001"] == 2
    assert counts["other"] == 4000 - len(KNOWN_CLOSE_CODES)


@pytest.mark.parametrize(("code", "label"), [
    (1000, "1000"), (4001, "4001"), (None, "none"), (3999, "other"), (4999, "other"),
    (1005, "other"), (0, "other"), (-1, "other"), (65535, "other"),
])
def test_close_label(code: int | None, label: str) -> None:
    assert close_label(code) == label


@pytest.mark.parametrize("code", [3999, 4999])
async def test_a_client_chosen_close_code_is_counted_as_other(
        gateway: GatewayHandle, code: int) -> None:
    """Once the session counts closes with ``Metrics.count_close``."""
    node = gateway.node
    server = gateway.gateway.server
    assert server is not None
    canary = await gateway.client("canary")
    known = set(server.handler_tasks)
    # One connection closes after authentication, one before it (no hello).
    client = await gateway.client("u1")
    ws = await connect(gateway.ws_url, compression=None, open_timeout=5)
    handlers = server.handler_tasks - known  # each is done once its session cleaned up
    assert len(handlers) == 2
    await client.ws.close(code)
    await ws.close(code)
    await asyncio.wait_for(asyncio.gather(*handlers), 5)
    assert (await canary.ping())["t"] == "pong"
    counts = label_values(node.metrics.registry, "presence_closes_total", "code")
    assert str(code) not in counts
    assert set(counts) <= ALLOWED_CLOSE_LABELS
    assert counts.get("other", 0) == 2
