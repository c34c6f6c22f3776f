"""Entry point of `joey serve gateway`."""

from __future__ import annotations

import logging

import redis
from prometheus_client import start_http_server

from joey_core import tls
from joey_core.heartbeats import ServiceHeartbeat
from joey_core.lifecycle import configure_logging, harden_process, shutdown_event
from joey_gateway import grpc_server, http_server
from joey_gateway.service import Gateway
from joey_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SERVICE = "gateway"


def serve() -> None:
    harden_process()
    settings = GatewaySettings()
    configure_logging(settings)
    stop = shutdown_event()
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics on %s port %d", settings.metrics_host, settings.metrics_port)
    gateway = Gateway(settings)
    grpc, grpc_port = grpc_server.start_server(gateway, settings)
    http, http_port = http_server.start_server(gateway, settings, tls.server_context(settings))
    heartbeat = ServiceHeartbeat(
        redis.Redis.from_url(settings.redis_url.get_secret_value()), settings, SERVICE
    )
    failed = False
    try:
        # The heartbeat says "ready" (what `joey up` waits for) only once both listeners accept calls.
        http.wait_started()
        log.info(
            "Open Inference Protocol on gRPC port %d and HTTP port %d (%s)",
            grpc_port,
            http_port,
            "TLS" if settings.tls_cert else "plaintext",
        )
        heartbeat.beat()
        while not stop.wait(heartbeat.interval_s):
            if not http.alive:
                # A gateway half serving would still beat as ready: stop, and let the supervisor see it.
                log.error("the REST server stopped on its own; stopping the gateway")
                failed = True
                break
            heartbeat.beat()
    finally:
        # Stop accepting connections (an open keep-alive one can still send), let calls in flight finish
        # (each ends by its deadline), then stop reading replies.
        http.shutdown()
        stopped = grpc.stop(grace=settings.request_timeout_s)
        if not gateway.drain(settings.request_timeout_s):
            log.warning("requests still in flight after %.0f s; stopping anyway", settings.request_timeout_s)
        stopped.wait()
        http.wait()
        heartbeat.retire()
        gateway.close()
        log.info("stopped")
    if failed:
        raise SystemExit(1)
