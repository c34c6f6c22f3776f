from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import redis

from joey_engine.settings import EngineSettings
from joey_engine.slots import SlotLeases


def test_slot_leases_share_replicas_between_engines(
    engine_settings: EngineSettings, redis_client: redis.Redis, make_deployment: Callable[..., Any]
) -> None:
    deployment = make_deployment(replicas=2)
    prefix = f"{engine_settings.redis_prefix}:leases-{secrets.token_hex(3)}"
    first = SlotLeases(redis_client, prefix, "engine-a", ttl_s=5.0)
    second = SlotLeases(redis_client, prefix, "engine-b", ttl_s=5.0)
    assert first.claim(deployment, 0) and not second.claim(deployment, 0) and second.claim(deployment, 1)
    assert first.renew(deployment, 0) and not second.renew(deployment, 0)
    second.release(deployment, 0)  # not its lease: no effect
    assert redis_client.get(first.key(deployment, 0)) == b"engine-a"
    assert 0 < redis_client.pttl(first.key(deployment, 0)) <= 5000
    # An expired lease (deleted here) nobody took is taken back on renewal; one another engine took is lost.
    redis_client.delete(first.key(deployment, 0))
    assert first.renew(deployment, 0) and redis_client.get(first.key(deployment, 0)) == b"engine-a"
    redis_client.delete(first.key(deployment, 0))
    assert second.claim(deployment, 0) and not first.renew(deployment, 0)
    second.release(deployment, 0)
    second.release(deployment, 1)
    assert redis_client.keys(f"{prefix}:*") == []
