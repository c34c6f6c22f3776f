"""Autoscaling: move each autoscaled deployment's replicas between its min and max on queue age.

The signal is the longest time a record waited in the pipeline's inputs topic before a replica took
it, as the replicas report it in their heartbeats. It grows when the replicas fall behind and stays
near zero while they keep up, on any Kafka-compatible broker (consumer lag would need the log-end
offsets, which the embedded broker reports wrongly). One step at a time: a replica more once the age
stayed above the threshold for ``scale_up_after_s``, a replica less after ``scale_down_after_s`` below.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import redis

from joey_core import heartbeats
from joey_registry.domain import Autoscale
from joey_registry.periodic import Periodic
from joey_registry.service import Registry

log = logging.getLogger(__name__)

_LEADER_KEY = "autoscaler-leader"


@dataclass
class Trend:
    """Since when a deployment's queue age has been above (or not above) its threshold."""

    deployment_id: str
    above_since: float | None = None
    below_since: float | None = None


def decide(config: Autoscale, replicas: int, queue_age_s: float, trend: Trend, now: float) -> int:
    """The replicas the deployment should run next, given the latest queue age."""
    if queue_age_s > config.queue_age_threshold_s:
        trend.below_since = None
        trend.above_since = trend.above_since if trend.above_since is not None else now
        if now - trend.above_since >= config.scale_up_after_s and replicas < config.max_replicas:
            trend.above_since = now  # the new replica gets a full period to make a difference
            return replicas + 1
    else:
        trend.above_since = None
        trend.below_since = trend.below_since if trend.below_since is not None else now
        if now - trend.below_since >= config.scale_down_after_s and replicas > config.min_replicas:
            trend.below_since = now
            return replicas - 1
    return min(max(replicas, config.min_replicas), config.max_replicas)


class Autoscaler(Periodic):
    """Runs :func:`decide` for every autoscaled deployment every ``interval_s``. When several
    registries run, the one holding a Redis lease does it, so two never scale the same deployment."""

    def __init__(self, registry: Registry, interval_s: float) -> None:
        super().__init__("autoscaler", interval_s, self._round)
        self._registry = registry
        self._instance_id = secrets.token_hex(8)
        self._trends: dict[str, Trend] = {}

    def _round(self) -> None:
        if self._lead():
            self.tick(time.monotonic())

    def _lead(self) -> bool:
        client = self._registry.redis
        key = f"{self._registry.settings.redis_prefix}:{_LEADER_KEY}"
        ttl_ms = int(self._interval_s * 3000)
        if client.set(key, self._instance_id, nx=True, px=ttl_ms):
            return True
        holder = client.get(key)
        if holder == self._instance_id.encode():
            client.pexpire(key, ttl_ms)
            return True
        return False

    def tick(self, now: float) -> None:
        registry = self._registry
        seen = set()
        for spec in registry.store.active_deployments():
            d = spec.deployment
            if d.autoscale is None:
                continue
            key = f"{d.workspace}/{d.pipeline}"
            seen.add(key)
            trend = self._trends.get(key)
            if trend is None or trend.deployment_id != d.deployment_id:
                trend = self._trends[key] = Trend(d.deployment_id)
            try:
                views = heartbeats.read(
                    registry.redis, registry.settings.redis_prefix, d.workspace, d.pipeline
                )
            except redis.RedisError as exc:
                log.warning("cannot read the replicas of %s: %s", key, exc)
                continue
            # A replica still loading has taken no records: its 0 is not a measurement.
            ages = [
                v.beat.queue_age_s
                for v in views
                if v.alive and v.beat.loaded and v.beat.deployment_id == d.deployment_id
            ]
            if not ages:
                continue  # nothing measured yet (starting, or every replica down)
            age = max(ages)
            target = decide(d.autoscale, d.replicas, age, trend, now)
            if target != d.replicas:
                log.info(
                    "scaling %s v%d from %d to %d replicas (queue age %.2f s, threshold %.2f s)",
                    key,
                    d.pipeline_version,
                    d.replicas,
                    target,
                    age,
                    d.autoscale.queue_age_threshold_s,
                )
                registry.scale(d.workspace, d.pipeline, d.deployment_id, target)
        for key in set(self._trends) - seen:
            del self._trends[key]
