"""What the gateway serves a pipeline as: its tensors, read from the deployed pipeline version; and the last
known catalog while the registry cannot answer."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from joey.client import Client
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_gateway.catalog import TensorInfo, _info
from tests.conftest import ServiceProcess, Stack, free_port, wait_registry_ready, wait_until
from tests.registry.helpers import Person


def _model(name: str, mapping: dict[str, str] | None = None) -> pb.ResolvedStep:
    return pb.ResolvedStep(
        model=name,
        version=1,
        inputs=[pb.TensorSpec(name="features", dtype="float32", shape=[-1, 4])],
        outputs=[pb.TensorSpec(name="label", dtype="int64", shape=[-1])],
        input_mapping=mapping or {},
    )


def test_a_pipeline_starting_with_a_split_reads_its_first_arms_inputs() -> None:
    """A split step has no model of its own: without its arms the pipeline would seem to take no inputs, and
    every request would be checked against nothing (or a later step's inputs)."""
    split = pb.ResolvedStep(arms=[_model("a", {"features": "petals"}), _model("b", {"features": "petals"})])
    status = pb.DeploymentStatus(
        deployment=pb.Deployment(workspace="w", pipeline="p", pipeline_version=1), status="Running"
    )
    info = _info(status, pb.PipelineVersion(version=1, steps=[split, pb.ResolvedStep(checks={"c": "1 > 0"})]))
    assert info.inputs == (TensorInfo("petals", "FP32", (-1, 4)),)
    assert info.outputs == (TensorInfo("label", "INT64", (-1,)),)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of the test's own on a free port (never the shared one: this test stops it)."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_until(up, 30, "the test's own redis-server")
    yield f"redis://127.0.0.1:{port}/0", process
    process.kill()
    process.wait()


def test_the_last_known_catalog_serves_while_the_registry_and_redis_are_down(
    stack: Stack,
    settings: CommonSettings,
    service_factory: Callable[..., ServiceProcess],
    iris_model: Path,
    own_redis: tuple[str, subprocess.Popen[bytes]],
    new_person: Callable[[], Person],
) -> None:
    """A gateway whose registry (a process of the test's own, on the session's database) and Redis (the
    test's own) both die: callers it served keep being served from the last known catalog, logged once and
    counted; a caller it never authorized is refused (503), nothing is served unchecked."""
    registry_addr = f"127.0.0.1:{free_port()}"
    registry = service_factory("registry", JOEY_REGISTRY_ADDR=registry_addr)
    wait_registry_ready(registry_addr)
    client = Client(settings=settings)
    pipeline = client.build_pipeline("iris-stale").add_model_step(
        client.upload_model("iris-stale", iris_model)
    )
    pipeline.deploy(replicas=1, timeout=90)
    http_port, metrics_port = free_port(), free_port()
    redis_url, redis_process = own_redis
    gateway = service_factory(
        "gateway",
        JOEY_INSTANCE_ID=f"gateway-stale-{secrets.token_hex(3)}",
        JOEY_REGISTRY_ADDR=registry_addr,
        JOEY_REDIS_URL=redis_url,
        JOEY_OIP_GRPC_ADDR=f"127.0.0.1:{free_port()}",
        JOEY_OIP_HTTP_ADDR=f"127.0.0.1:{http_port}",
        JOEY_METRICS_PORT=str(metrics_port),
    )
    url = f"http://127.0.0.1:{http_port}/v2/models/iris-stale/infer"
    body = {
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]
    }
    admin = os.environ["JOEY_TOKEN"]
    try:
        wait_until(lambda: post(url, body, admin)[0] == 200, 60, "the gateway serving")
        stranger = new_person()  # a valid token the gateway has never seen
        registry.kill9()
        redis_process.kill()
        redis_process.wait()

        def served_from_the_last_known_catalog() -> bool:
            status, reply = post(url, body, admin)
            assert status == 200, reply
            # Until the status cache expires the catalog does not ask, so it has no outage to note yet.
            return "serving the last known catalog" in gateway.log_text()

        wait_until(served_from_the_last_known_catalog, 60, "answers from the last known catalog", 0.2)
        status, reply = post(url, body, stranger.token)
        assert status == 503 and "registry unavailable" in reply["error"], reply
        log = gateway.log_text()
        assert log.count("serving the last known catalog") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'joey_gateway_stale_answers_total{kind="auth"}' in metrics
        assert "joey_gateway_catalog_stale 1.0" in metrics
        assert gateway.alive()
    finally:
        gateway.stop()
        pipeline.undeploy()


def test_the_last_known_catalog_serves_while_the_registrys_redis_is_down_then_expires(
    stack: Stack,
    settings: CommonSettings,
    service_factory: Callable[..., ServiceProcess],
    iris_model: Path,
    own_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """The registry keeps running but its Redis (the test's own) dies: it answers the deployment status
    UNAVAILABLE, and the gateway serves the last known catalog until JOEY_CATALOG_STALE_S after it was
    fetched, then refuses (503) rather than serve it unbounded."""
    redis_url, redis_process = own_redis
    registry_addr = f"127.0.0.1:{free_port()}"
    registry = service_factory("registry", JOEY_REGISTRY_ADDR=registry_addr, JOEY_REDIS_URL=redis_url)
    wait_registry_ready(registry_addr)
    client = Client(settings=settings)
    pipeline = client.build_pipeline("iris-stale-redis").add_model_step(
        client.upload_model("iris-stale-redis", iris_model)
    )
    pipeline.deploy(replicas=1, timeout=90)
    http_port = free_port()
    gateway = service_factory(
        "gateway",
        JOEY_INSTANCE_ID=f"gateway-stale-redis-{secrets.token_hex(3)}",
        JOEY_REGISTRY_ADDR=registry_addr,
        JOEY_OIP_GRPC_ADDR=f"127.0.0.1:{free_port()}",
        JOEY_OIP_HTTP_ADDR=f"127.0.0.1:{http_port}",
        JOEY_CATALOG_STALE_S="5",
    )
    url = f"http://127.0.0.1:{http_port}/v2/models/iris-stale-redis/infer"
    body = {
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]
    }
    admin = os.environ["JOEY_TOKEN"]
    try:
        wait_until(lambda: post(url, body, admin)[0] == 200, 60, "the gateway serving")
        redis_process.kill()
        redis_process.wait()
        status, reply = post(url, body, admin)
        assert status == 200, reply
        wait_until(lambda: post(url, body, admin)[0] == 503, 60, "the last known catalog expired")
        status, reply = post(url, body, admin)
        assert status == 503 and "Redis" in reply["error"], reply
        assert gateway.log_text().count("serving the last known catalog") == 1
        assert registry.alive() and gateway.alive()
    finally:
        gateway.stop()
        pipeline.undeploy()


def post(url: str, body: Any, token: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except urllib.error.URLError as exc:  # not listening yet
        return 0, {"error": str(exc.reason)}
