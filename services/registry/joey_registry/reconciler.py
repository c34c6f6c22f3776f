"""Keeps joey.deployments in agreement with Postgres while the registry runs.

A deploy, rollback, scale or undeploy whose publish failed or timed out (or whose commit failed) leaves
its intent behind (see ``Registry._change``); the broker may still have taken the record. Every
``interval_s`` this publishes again what Postgres holds for those pipelines, so Kafka and Postgres
agree again within one round of the broker answering, without waiting for a registry restart.
"""

from __future__ import annotations

import logging
import threading

from joey_registry.errors import Unavailable
from joey_registry.service import Registry

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, registry: Registry, interval_s: float) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                reconciled = self._registry.reconcile(everything=False)
            except Unavailable as exc:
                log.warning("deployments left to reconcile, the broker does not answer: %s", exc)
            except Exception:
                # Best effort, every round: a broken round must not stop the next one.
                log.exception("reconciling deployments failed")
            else:
                if reconciled:
                    log.info("reconciled %d pipelines with joey.deployments", reconciled)
