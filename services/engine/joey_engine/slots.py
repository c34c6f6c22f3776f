"""Replica slots: Redis leases that spread a deployment's N replicas over the running engines.

Slot ``i`` of a deployment is held by the engine whose instance id is stored under its key;
the holder renews it and deletes it on stop, and a crashed holder's slot frees itself when
the lease expires, so the total number of replicas stays N.
"""

from __future__ import annotations

import redis

from joey_engine.deployment import Deployment

# Check-and-set in one atomic step. A renewal also takes back a lease that expired while this engine was
# busy (stopping replicas can take seconds), as long as no other engine claimed it meanwhile.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class SlotLeases:
    def __init__(self, client: redis.Redis, prefix: str, owner: str, ttl_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self._owner = owner
        self._ttl_ms = int(ttl_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def key(self, deployment: Deployment, slot: int) -> str:
        return f"{self._prefix}:slot:{deployment.key}:{deployment.deployment_id}:{slot}"

    def claim(self, deployment: Deployment, slot: int) -> bool:
        return bool(self._client.set(self.key(deployment, slot), self._owner, nx=True, px=self._ttl_ms))

    def renew(self, deployment: Deployment, slot: int) -> bool:
        """False when another engine holds the slot now."""
        return bool(self._renew(keys=[self.key(deployment, slot)], args=[self._owner, self._ttl_ms]))

    def release(self, deployment: Deployment, slot: int) -> None:
        self._release(keys=[self.key(deployment, slot)], args=[self._owner])
