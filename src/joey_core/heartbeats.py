"""Replica heartbeats in Redis: written by engine replicas, read by the registry's status.

Two keys per replica:
* ``<prefix>:hb:<workspace>/<pipeline>:<replica_id>`` holds the latest heartbeat, with a TTL:
  while it exists the replica is alive.
* ``<prefix>:replicas:<workspace>/<pipeline>`` is a hash replica_id -> last heartbeat,
  without TTL, so a replica whose key expired can still be reported as dead.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

DEFAULT_TTL_S = 5.0


@dataclass
class ReplicaHeartbeat:
    replica_id: str
    deployment_id: str
    pipeline_version: int
    loaded: bool
    partitions: list[int] = field(default_factory=list)
    error: str = ""
    host: str = ""
    sent_at: float = field(default_factory=time.time)
    assigned: bool = False
    """Joined the consumer group: the group has assigned it partitions (possibly none) at least once."""
    queue_age_s: float = 0.0
    """The longest a record taken since the previous heartbeat had waited in the inputs topic."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ReplicaHeartbeat:
        data: dict[str, Any] = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _live_key(prefix: str, workspace: str, pipeline: str, replica_id: str) -> str:
    return f"{prefix}:hb:{workspace}/{pipeline}:{replica_id}"


def _index_key(prefix: str, workspace: str, pipeline: str) -> str:
    return f"{prefix}:replicas:{workspace}/{pipeline}"


def publish(
    client: redis.Redis, prefix: str, workspace: str, pipeline: str, beat: ReplicaHeartbeat, ttl_s: float
) -> None:
    beat.sent_at = time.time()
    payload = beat.to_json()
    pipe = client.pipeline()
    pipe.set(_live_key(prefix, workspace, pipeline, beat.replica_id), payload, px=int(ttl_s * 1000))
    pipe.hset(_index_key(prefix, workspace, pipeline), beat.replica_id, payload)
    pipe.execute()


def retire(client: redis.Redis, prefix: str, workspace: str, pipeline: str, replica_id: str) -> None:
    """Remove a replica that stopped cleanly (a crashed one stays listed as dead)."""
    pipe = client.pipeline()
    pipe.delete(_live_key(prefix, workspace, pipeline, replica_id))
    pipe.hdel(_index_key(prefix, workspace, pipeline), replica_id)
    pipe.execute()


@dataclass
class ReplicaView:
    beat: ReplicaHeartbeat
    alive: bool


def read(client: redis.Redis, prefix: str, workspace: str, pipeline: str) -> list[ReplicaView]:
    """Every replica known for the pipeline, alive or dead, sorted by replica id."""
    index: dict[bytes, bytes] = client.hgetall(_index_key(prefix, workspace, pipeline))  # type: ignore[assignment]
    if not index:
        return []
    ids = sorted(k.decode() for k in index)
    live = client.mget([_live_key(prefix, workspace, pipeline, rid) for rid in ids])
    views = []
    for rid, current in zip(ids, live, strict=True):
        text = current if current is not None else index[rid.encode()]
        views.append(ReplicaView(ReplicaHeartbeat.from_json(text), alive=current is not None))
    return views


def forget_dead(client: redis.Redis, prefix: str, workspace: str, pipeline: str, older_than_s: float) -> None:
    """Drop dead replicas last seen more than ``older_than_s`` ago from the index."""
    cutoff = time.time() - older_than_s
    for view in read(client, prefix, workspace, pipeline):
        if not view.alive and view.beat.sent_at < cutoff:
            client.hdel(_index_key(prefix, workspace, pipeline), view.beat.replica_id)


def _service_key(prefix: str, service: str, instance: str) -> str:
    return f"{prefix}:svc:{service}:{instance}"


def publish_service(client: redis.Redis, prefix: str, service: str, instance: str, ttl_s: float) -> None:
    """Mark a service instance (engine, logger, ...) alive and ready for ``ttl_s`` seconds."""
    client.set(_service_key(prefix, service, instance), json.dumps({"at": time.time()}), px=int(ttl_s * 1000))


def retire_service(client: redis.Redis, prefix: str, service: str, instance: str) -> None:
    client.delete(_service_key(prefix, service, instance))


def live_services(client: redis.Redis, prefix: str, service: str) -> list[str]:
    """Instance ids of the ready instances of ``service``."""
    keys: list[bytes] = client.keys(_service_key(prefix, service, "*"))  # type: ignore[assignment]
    return sorted(k.decode().rsplit(":", 1)[1] for k in keys)
