"""What the connector-bridge's end-to-end tests share: a workspace with a deployed pipeline, a
connector-bridge process of the test's own, and the checks of the rows a sink holds."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from joey.client import Client
from joey_core.settings import CommonSettings
from tests.conftest import SHORT_GROUP_SESSION, ServiceProcess, wait_service_ready

FEATURES = [5.1, 3.5, 1.4, 0.2]
"""An iris setosa: every input is one, so every output's label is 0."""


@dataclass
class World:
    client: Client
    pipeline: str
    model: Any


@contextmanager
def deployed_pipeline(settings: CommonSettings, iris_model: Path, prefix: str) -> Iterator[World]:
    """A workspace of its own with pipeline ``fed`` (the iris model) deployed."""
    with Client(settings=settings) as client:
        client.set_current_workspace(client.create_workspace(f"{prefix}-{secrets.token_hex(3)}"))
        model = client.upload_model("iris-fed", iris_model)
        pipeline = client.build_pipeline("fed").add_model_step(model)
        pipeline.deploy(replicas=1, timeout=90)
        try:
            yield World(client, "fed", model)
        finally:
            pipeline.undeploy()


def start_bridge(
    factory: Callable[..., ServiceProcess], env: dict[str, str], kafka: dict[str, Any] | None = None
) -> ServiceProcess:
    """A connector-bridge quick to act, its librdkafka settings ``kafka`` over the tests' short session."""
    bridge = factory(
        "connector_bridge",
        JOEY_BATCH_SIZE="10",
        JOEY_POLL_INTERVAL_S="0.1",
        JOEY_STATUS_INTERVAL_S="0.2",
        JOEY_RETRY_BACKOFF_MAX_S="0.5",
        JOEY_KAFKA_CONFIG=json.dumps(SHORT_GROUP_SESSION | (kafka or {})),
    )
    wait_service_ready(env, "connector-bridge")
    return bridge


def table_rows(url: str, table: str) -> list[tuple]:
    """(request_id, source_key, outputs, error, pipeline_version) of a Postgres sink's table."""
    with psycopg.connect(url) as conn:
        try:
            return conn.execute(
                f"SELECT request_id, source_key, outputs, error, pipeline_version FROM {table}"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def assert_results(found: list[tuple], expected: set[str], unique: bool = True) -> None:
    """A row per expected request id (exactly one when ``unique``), each the iris setosa's answer."""
    ids = [r[0] for r in found]
    assert not unique or len(ids) == len(set(ids)), "a request id twice"
    assert set(ids) == expected, (sorted(set(ids) - expected)[:5], sorted(expected - set(ids))[:5])
    for request_id, source_key, outputs, error, version in found:
        assert source_key is None or request_id.endswith(f"/{source_key}")
        assert error is None and version == 1
        assert outputs["label"] == 0, outputs
