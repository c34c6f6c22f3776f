"""Entry point of `joey serve logger`."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from joey_core.lifecycle import configure_logging, harden_process, shutdown_event
from joey_logger.service import LoggerService
from joey_logger.settings import LoggerSettings
from joey_logger.sink import create_sink

log = logging.getLogger(__name__)


def serve() -> None:
    harden_process()
    settings = LoggerSettings()
    configure_logging(settings)
    stop = shutdown_event()
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics on %s port %d", settings.metrics_host, settings.metrics_port)
    # run() closes the consumer, sink and heartbeat on any exit; a fatal error then propagates.
    LoggerService(settings, create_sink(settings)).run(stop)
