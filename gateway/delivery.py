"""Broker delivery: messages of the channels this node subscribes to, into the hub.

Joins and leaves go through the gap repair (gateway/repair.py), which holds them back
while it re-reads a channel after a broker failover, so that a repair and live
delivery never undo each other; churn records go straight to the channel's members.
"""

from __future__ import annotations

from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.repair import GapRepair
from presence.channels import is_churn
from presence.messages import ChurnMsg, JoinMsg, LeaveMsg, decode_message


def deliver(hub: Hub, repair: GapRepair, metrics: Metrics, topic: str, payload: bytes) -> None:
    """Hand one broker message of ``topic`` to the hub."""
    metrics.broker_in.inc()
    msg = decode_message(payload)
    if isinstance(msg, JoinMsg):
        repair.deliver(topic, lambda: hub.on_join(topic, msg.user, msg.meta, msg.ts))
    elif isinstance(msg, LeaveMsg):
        repair.deliver(topic, lambda: hub.on_leave(
            topic, msg.user, msg.conn, msg.last_seen, msg.ts))
    elif isinstance(msg, ChurnMsg) and is_churn(topic):
        hub.broadcast(topic, {"t": "churn", "ch": topic, "ts": msg.ts,
                              "records": [r.to_wire() for r in msg.records]})
