"""Bounds on password checks: how many run at once, and how often one name may be guessed.

Argon2 is slow and takes 64 MiB per check by design, so a flood of logins could take the registry's
threads and memory: a semaphore bounds the checks running at once. Wrong passwords are counted in
Redis per key (a username and the caller's host, or a username alone), so every registry replica
sees the same count; past the limit the key is refused without a check, for a time that doubles
with each further failure.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from joey_registry.errors import ResourceExhausted, Unavailable
from joey_registry.settings import RegistrySettings

BUSY = "too many logins at once; retry"


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``), port dropped."""
    scheme, _, address = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host, _, _ = address.rpartition(":")
        return host.strip("[]") or address
    return peer


class LoginGuard:
    def __init__(self, settings: RegistrySettings, client: redis.Redis) -> None:
        self._settings = settings
        self._redis = client
        self._slots = threading.BoundedSemaphore(settings.login_concurrency)

    @contextmanager
    def hashing(self) -> Iterator[None]:
        """A slot to hash or check a password in, or ResourceExhausted if none frees up in time."""
        if not self._slots.acquire(timeout=self._settings.login_wait_s):
            raise ResourceExhausted(BUSY)
        try:
            yield
        finally:
            self._slots.release()

    def _keys(self, *parts: str) -> tuple[str, str]:
        # Hashed: a password pasted as a username must not land in Redis either.
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
        prefix = f"{self._settings.redis_prefix}:login"
        return f"{prefix}:failures:{digest}", f"{prefix}:blocked:{digest}"

    def blocked(self, *key: str) -> bool:
        try:
            return bool(self._redis.exists(self._keys(*key)[1]))
        except redis.RedisError as exc:
            raise Unavailable(f"could not check login attempts in Redis: {exc}") from None

    def failed(self, *key: str) -> None:
        failures, blocked = self._keys(*key)
        settings = self._settings
        try:
            with self._redis.pipeline() as pipe:
                pipe.incr(failures)
                pipe.expire(failures, settings.login_failure_window_s, nx=True)
                count = int(pipe.execute()[0])
            if count >= settings.login_max_failures:
                backoff = min(settings.login_backoff_base_s * 2.0**count, settings.login_failure_window_s)
                self._redis.set(blocked, 1, px=max(1, int(backoff * 1000)))
        except redis.RedisError as exc:
            raise Unavailable(f"could not count login attempts in Redis: {exc}") from None

    def succeeded(self, *key: str) -> None:
        try:
            self._redis.delete(*self._keys(*key))
        except redis.RedisError as exc:
            raise Unavailable(f"could not reset login attempts in Redis: {exc}") from None
