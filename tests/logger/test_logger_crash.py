"""kill -9 of a `joey serve logger` process mid-stream loses no record and doubles none."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

import redis

from joey_core import heartbeats
from joey_core.settings import CommonSettings
from joey_logger.service import SERVICE
from tests.conftest import ServiceProcess, wait_until
from tests.logger.helpers import LogProducer, count_rows, log_record

N = 20_000
RATE = 2_500
"""Records per second: the stream lasts about 8 s, so the kill lands well inside it."""
CHUNK = 250


def produce_steadily(produce: LogProducer, pipeline: str, failures: list[BaseException]) -> None:
    try:
        started = time.monotonic()
        for first in range(0, N, CHUNK):
            produce.records(log_record(pipeline, i) for i in range(first, first + CHUNK))
            pause = started + (first + CHUNK) / RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the stream, not waiting for readiness
    except BaseException as exc:
        failures.append(exc)


def test_a_killed_logger_loses_and_doubles_nothing(
    env: dict[str, str],
    settings: CommonSettings,
    service_factory: Callable[..., ServiceProcess],
    isolated_database: str,
    produce: LogProducer,
    pipeline: str,
) -> None:
    group = f"joey.logger.test-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(env["JOEY_REDIS_URL"])

    def start(instance: str) -> ServiceProcess:
        process = service_factory(
            "logger", JOEY_DATABASE_URL=isolated_database, JOEY_LOGGER_GROUP=group, JOEY_INSTANCE_ID=instance
        )
        wait_until(
            lambda: (
                instance in heartbeats.live_services(client, settings.redis_prefix, SERVICE)
                or not process.alive()
            ),
            60,
            f"logger {instance} ready",
            interval=0.1,
        )
        assert process.alive(), process.log_text()
        return process

    first = start(f"crash-first-{secrets.token_hex(3)}")
    failures: list[BaseException] = []
    producer = threading.Thread(target=produce_steadily, args=(produce, pipeline, failures), daemon=True)
    producer.start()

    wait_until(lambda: count_rows(isolated_database, pipeline)[0] >= 2_000, 30, "first rows")
    first.kill9()
    at_kill = count_rows(isolated_database, pipeline)[0]
    assert producer.is_alive(), "the stream ended before the kill; the test proves nothing"
    assert at_kill < N

    second = start(f"crash-second-{secrets.token_hex(3)}")
    producer.join(60)
    assert not producer.is_alive() and not failures, failures
    wait_until(lambda: count_rows(isolated_database, pipeline) == (N, N), 60, f"{N} rows after the restart")
    assert count_rows(isolated_database, pipeline) == (N, N)
    assert "Traceback" not in second.log_text()
    assert second.stop() == 0, second.log_text()
