from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from joey_core import heartbeats


def test_serve_runs_until_sigterm_and_retires(
    env: dict[str, str], service_factory: Callable[..., Any]
) -> None:
    instance = f"app-test-{secrets.token_hex(3)}"
    # A workspace of its own keeps this engine away from every other test's deployments.
    service = service_factory(
        "engine", JOEY_INSTANCE_ID=instance, JOEY_WORKSPACES=json.dumps([f"app-{secrets.token_hex(3)}"])
    )
    client = redis.Redis.from_url(env["JOEY_REDIS_URL"])
    prefix = env["JOEY_REDIS_PREFIX"]
    deadline = time.monotonic() + 30
    while instance not in heartbeats.live_services(client, prefix, "engine"):
        assert service.alive(), service.log_text()
        assert time.monotonic() < deadline, "engine not ready:\n" + service.log_text()
        time.sleep(0.1)
    assert service.stop() == 0, service.log_text()
    assert instance not in heartbeats.live_services(client, prefix, "engine")
    assert "engine " + instance + " stopping" in service.log_text()
