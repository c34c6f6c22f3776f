"""Entry point of `joey serve connector-bridge`."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from joey_connector_bridge.service import ConnectorBridge
from joey_connector_bridge.settings import BridgeSettings
from joey_core import db
from joey_core.lifecycle import configure_logging, harden_process, shutdown_event

log = logging.getLogger(__name__)


def serve() -> None:
    harden_process()
    settings = BridgeSettings()
    configure_logging(settings)
    stop = shutdown_event()
    db.prepare(settings.database_url.get_secret_value())
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics on %s port %d", settings.metrics_host, settings.metrics_port)
    # run() stops every bridge it runs and retires its heartbeat on any exit; a fatal error then propagates.
    ConnectorBridge(settings).run(stop)
