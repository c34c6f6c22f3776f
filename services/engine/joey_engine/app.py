"""`joey serve engine`: run the engine until SIGTERM/SIGINT, then drain, commit and close."""

from __future__ import annotations

import logging

import prometheus_client

from joey import lifecycle
from joey_engine.engine import Engine
from joey_engine.settings import EngineSettings

log = logging.getLogger(__name__)


def serve() -> None:
    settings = EngineSettings()
    lifecycle.configure_logging(settings.log_level)
    stop = lifecycle.shutdown_event()
    if settings.metrics_port:
        prometheus_client.start_http_server(settings.metrics_port)
        log.info("metrics on port %d", settings.metrics_port)
    Engine(settings).run(stop)
