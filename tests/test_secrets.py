"""Services started with a password in the database URL and a Kafka SASL password never write either."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import redis

from joey_core import heartbeats
from tests.conftest import ServiceProcess, free_port, wait_registry_ready, wait_until

DB_PASSWORD = f"dbpw-{secrets.token_hex(6)}"
SASL_PASSWORD = f"saslpw-{secrets.token_hex(6)}"


def _with_password(url: str) -> str:
    # Postgres on 127.0.0.1 trusts its users: the password is accepted and ignored.
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PASSWORD}@", 1)


def test_no_service_logs_the_database_or_sasl_password(
    env: dict[str, str], service_factory: Callable[..., ServiceProcess]
) -> None:
    registry_addr = f"127.0.0.1:{free_port()}"
    registry = service_factory(
        "registry",
        JOEY_REGISTRY_ADDR=registry_addr,
        JOEY_DATABASE_URL=_with_password(env["JOEY_DATABASE_URL"]),
        JOEY_LOG_LEVEL="DEBUG",
    )
    wait_registry_ready(registry_addr)
    # The broker speaks no SASL: the gateway's Kafka clients fail to authenticate, and say so.
    instance = f"gateway-secrets-{secrets.token_hex(3)}"
    gateway = service_factory(
        "gateway",
        JOEY_INSTANCE_ID=instance,
        JOEY_OIP_GRPC_ADDR=f"127.0.0.1:{free_port()}",
        JOEY_OIP_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        JOEY_REGISTRY_ADDR=registry_addr,
        JOEY_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        JOEY_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        JOEY_KAFKA_SASL_USERNAME="joey",
        JOEY_KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        JOEY_LOG_LEVEL="DEBUG",
    )
    client = redis.Redis.from_url(env["JOEY_REDIS_URL"])
    wait_until(
        lambda: instance in heartbeats.live_services(client, env["JOEY_REDIS_PREFIX"], "gateway"),
        60,
        "the gateway ready",
        0.1,
    )
    wait_until(lambda: "SASL" in gateway.log_text(), 60, "the gateway's failed SASL handshake")
    gateway.stop()
    registry.stop()
    # The identity secrets the session gives every service, too, when it does.
    others = [
        env[name]
        for name in ("JOEY_ADMIN_PASSWORD", "JOEY_SERVICE_TOKEN", "JOEY_SECRET_KEY")
        if env.get(name)
    ]
    for service in (registry, gateway):
        text = service.log_text()
        assert text, service.name
        for secret in (DB_PASSWORD, SASL_PASSWORD, *others):
            assert secret not in text, service.name
