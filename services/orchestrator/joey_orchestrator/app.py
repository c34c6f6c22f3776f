"""Entry point of `joey serve orchestrator`."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from joey_core import db
from joey_core.lifecycle import configure_logging, harden_process, shutdown_event
from joey_orchestrator.service import Orchestrator
from joey_orchestrator.settings import OrchestratorSettings

log = logging.getLogger(__name__)


def serve() -> None:
    harden_process()
    settings = OrchestratorSettings()
    configure_logging(settings)
    stop = shutdown_event()
    db.prepare(settings.database_url.get_secret_value())
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics on %s port %d", settings.metrics_host, settings.metrics_port)
    # run() stops every run it supervises (each fails, to be retried per its task) and retires its heartbeat.
    Orchestrator(settings).run(stop)
