"""Fixtures of the logger tests.

A logger under test gets a database and a consumer group of its own, so a logger started
elsewhere in the session (the `stack` fixture) neither takes its records nor is disturbed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from joey_core.settings import CommonSettings
from joey_logger.settings import LoggerSettings
from tests.conftest import SHORT_GROUP_SESSION, scratch_database, wait_until
from tests.logger.helpers import InProcessLogger, LogProducer, is_live


@pytest.fixture
def pipeline() -> str:
    """A pipeline name no other test uses: tests share the session database and topics."""
    return f"logtest-{secrets.token_hex(4)}"


@pytest.fixture
def produce(settings: CommonSettings) -> LogProducer:
    return LogProducer(settings)


@pytest.fixture
def isolated_database() -> Iterator[str]:
    """A fresh, migrated database that only this test's loggers write to."""
    with scratch_database("joey_logtest") as url:
        yield url


@pytest.fixture
def logger_settings(settings: CommonSettings, isolated_database: str) -> LoggerSettings:
    """A logger with its own database, consumer group and instance id."""
    token = secrets.token_hex(4)
    overrides = {
        "database_url": isolated_database,
        "logger_group": f"joey.logger.test-{token}",
        "instance_id": f"logtest-{token}",
        "retry_backoff_max_s": 1.0,
        # Joins its group in 1 s instead of 2, as the loggers `service_factory` starts do.
        "kafka_config": SHORT_GROUP_SESSION,
    }
    return LoggerSettings(**(settings.model_dump() | overrides))


@pytest.fixture
def logger(logger_settings: LoggerSettings) -> Iterator[InProcessLogger]:
    """A running in-process logger, ready (joined its group) when the test starts."""
    running = InProcessLogger(logger_settings).start()
    try:
        wait_until(lambda: is_live(logger_settings) or not running.alive(), 30, "logger heartbeat")
        assert running.alive(), f"logger failed at start: {running.error!r}"
        yield running
    finally:
        running.stop_event.set()
        running.thread.join(30)
