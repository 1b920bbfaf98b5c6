"""Assembly of the admin HTTP application: the admin API, churn ingest, engagement
signals, the autoscaler."""

from __future__ import annotations

from aiohttp import web

from cluster.autoscaler import Autoscaler, make_sampler
from gateway.admin import make_admin_app, metrics_on_decision
from gateway.churn_api import add_churn_routes
from gateway.engagement_api import add_engagement_routes
from gateway.node import Node


def build_admin(node: Node) -> tuple[web.Application, Autoscaler | None]:
    """The aiohttp app for the admin port and the autoscaler it reports (not started)."""
    cfg = node.settings.autoscale
    autoscaler = None
    if cfg.enabled:
        autoscaler = Autoscaler(
            cfg, make_sampler(node), on_decision=metrics_on_decision(node.metrics)
        )
    app = make_admin_app(node, autoscaler)
    add_churn_routes(app, node)
    add_engagement_routes(app, node)
    return app, autoscaler
