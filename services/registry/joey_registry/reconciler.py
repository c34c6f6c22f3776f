"""Keeps joey.deployments in agreement with Postgres while the registry runs.

A deploy, rollback, scale or undeploy whose publish failed or timed out (or whose commit failed) leaves
its intent behind (see ``Registry._change``); the broker may still have taken the record. Every
``interval_s`` this publishes again what Postgres holds for those pipelines, so Kafka and Postgres
agree again within one round of the broker answering, without waiting for a registry restart.

Each round also marks as errors the model conversions a stopped registry left unfinished.
"""

from __future__ import annotations

import logging

from joey_registry.errors import Unavailable
from joey_registry.periodic import Periodic
from joey_registry.service import Registry

log = logging.getLogger(__name__)


class Reconciler(Periodic):
    def __init__(self, registry: Registry, interval_s: float) -> None:
        super().__init__("reconciler", interval_s, self._round)
        self._registry = registry

    def _round(self) -> None:
        expired = self._registry.expire_conversions()
        if expired:
            log.warning("%d model conversions a stopped registry left unfinished: marked as errors", expired)
        try:
            reconciled = self._registry.reconcile(everything=False)
        except Unavailable as exc:
            log.warning("deployments left to reconcile, the broker does not answer: %s", exc)
        else:
            if reconciled:
                log.info("reconciled %d pipelines with joey.deployments", reconciled)
