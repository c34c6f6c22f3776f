"""`joey serve engine`: run the engine until SIGTERM/SIGINT, then drain, commit and close."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import prometheus_client
from prometheus_client import multiprocess

from joey_core import lifecycle
from joey_engine import sandbox_user
from joey_engine.service import Engine
from joey_engine.settings import EngineSettings

log = logging.getLogger(__name__)


def serve() -> None:
    lifecycle.harden_process()
    settings = EngineSettings()
    # Read once: replicas get the settings pickled and python steps a minimal environment, and with
    # the variables gone no child process inherits a credential through its environment.
    for key in [key for key in os.environ if key.startswith("JOEY_")]:
        del os.environ[key]
    lifecycle.configure_logging(settings)
    try:
        sandbox_user.check(settings)
    except ValueError as exc:
        raise SystemExit(f"joey engine: {exc}") from None
    stop = lifecycle.shutdown_event()
    metrics_dir = _serve_metrics(settings) if settings.metrics_port else None
    try:
        Engine(settings, metrics_dir=metrics_dir).run(stop)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_metrics(settings: EngineSettings) -> Path:
    """Serve the metrics of every replica process; returns the directory they write them to."""
    # prometheus_client's multiprocess mode: each replica process writes its metrics to files in this
    # directory, which the endpoint sums up. Replicas inherit the environment variable and read it when
    # they import prometheus_client; this process imported it already and keeps its own metrics in memory.
    directory = Path(tempfile.mkdtemp(prefix="joey-engine-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(directory))
    prometheus_client.start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    log.info("metrics on %s port %d", settings.metrics_host, settings.metrics_port)
    return directory
