"""The gateway as a separate process serving a deployed iris pipeline to standard Open Inference
Protocol clients (tritonclient over gRPC and REST, and plain HTTP requests)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from tritonclient.utils import InferenceServerException

from joey.client import Client, Pipeline
from joey_core import topics
from joey_core.records import DEADLINE_HEADER, dumps, header_value
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import ServiceProcess, Stack, free_port, wait_service_ready, wait_until
from tests.registry.helpers import Person, Stub
from train_model import make_records  # examples/, put on sys.path by conftest

log = logging.getLogger(__name__)

PIPELINE = "iris-gw"


@dataclass
class Gateway:
    process: ServiceProcess
    grpc_addr: str
    http_addr: str
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"http://{self.http_addr}"


@pytest.fixture(scope="module")
def client(stack: Stack, settings: CommonSettings) -> Client:
    return Client(settings=settings)


@pytest.fixture(scope="module")
def iris(client: Client, iris_model: Path) -> Iterator[Pipeline]:
    model = client.upload_model("iris-gw", iris_model)
    pipeline = client.build_pipeline(PIPELINE).add_model_step(model)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()  # its replica would otherwise take a share of the machine for the rest of the session


@pytest.fixture(scope="module")
def gateway(stack: Stack, service_factory: Callable[..., ServiceProcess]) -> Gateway:
    grpc_addr, http_addr, metrics_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    # Long enough for calls waiting on a killed engine's partitions to see them taken over.
    process = service_factory(
        "gateway",
        JOEY_OIP_GRPC_ADDR=grpc_addr,
        JOEY_OIP_HTTP_ADDR=http_addr,
        JOEY_REQUEST_TIMEOUT_S="120",
        JOEY_METRICS_PORT=str(metrics_port),
        # Readers of idle pipelines closed within the tests, and opened again by the next request.
        JOEY_STREAM_IDLE_S="2",
    )
    wait_service_ready(stack.env, "gateway")
    return Gateway(process, grpc_addr, http_addr, metrics_port)


def counter(gateway: Gateway, outcome: str, pipeline: str = PIPELINE) -> float:
    """joey_gateway_requests_total of ``pipeline`` ("" for unknown models) and ``outcome``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    workspace = "default" if pipeline else ""
    series = (
        f'joey_gateway_requests_total{{outcome="{outcome}",pipeline="{pipeline}",workspace="{workspace}"}}'
    )
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " "))


def reply_readers(gateway: Gateway) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith("joey_gateway_reply_readers "))


def features(count: int, seed: int) -> np.ndarray:
    return np.array([r["features"] for r in make_records(count, seed)], dtype=np.float32)


def direct(model_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(model_path))
    label, probabilities = session.run(["label", "probabilities"], {"features": x})
    return label, probabilities


def bearer(token: str | None = None) -> dict[str, str]:
    """The header presenting ``token``, the session admin's by default. Lower case: gRPC metadata keys
    must be (HTTP headers are case-insensitive)."""
    return {"authorization": f"Bearer {token or os.environ['JOEY_TOKEN']}"}


class Bearer(grpcclient.InferenceServerClientPlugin):
    """Adds the admin's header to every call of a tritonclient client."""

    def __call__(self, request: Any) -> None:
        request.headers.update(bearer())


def triton_grpc(gateway: Gateway) -> grpcclient.InferenceServerClient:
    triton = grpcclient.InferenceServerClient(gateway.grpc_addr)
    triton.register_plugin(Bearer())
    return triton


@dataclass
class Answer:
    status: int
    document: dict[str, Any]
    headers: Any


def call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
    """GET (or POST ``body`` as JSON) with ``headers``, the admin's token by default."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json", **(bearer() if headers is None else headers)},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Answer(response.status, json.loads(response.read()), response.headers)
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, json.loads(exc.read()), exc.headers)


def post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    answer = call(url, body)
    return answer.status, answer.document


def get(url: str) -> tuple[int, dict[str, Any]]:
    answer = call(url)
    return answer.status, answer.document


def test_tritonclient_grpc(gateway: Gateway, iris: Pipeline, iris_model: Path) -> None:
    triton = grpcclient.InferenceServerClient(gateway.grpc_addr)
    headers = bearer()
    assert triton.is_server_live()  # liveness needs no token
    assert triton.is_server_ready(headers=headers)
    assert triton.get_server_metadata(headers=headers).name == "joey"
    assert triton.is_model_ready(PIPELINE, headers=headers)
    metadata = triton.get_model_metadata(PIPELINE, as_json=True, headers=headers)
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("features", "FP32", ["-1", "4"])
    ]
    assert {t["name"]: t["datatype"] for t in metadata["outputs"]} == {
        "label": "INT64",
        "probabilities": "FP32",
    }

    x = features(7, seed=3)
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = triton.infer(PIPELINE, [tensor], request_id="req-1", headers=headers)
    label, probabilities = direct(iris_model, x)
    assert result.get_response().id == "req-1"
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    assert result.as_numpy("label").dtype == np.int64

    with pytest.raises(InferenceServerException) as missing:
        triton.infer("no-such-pipeline", [tensor], headers=headers)
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-pipeline" in missing.value.message()


def test_tritonclient_http(gateway: Gateway, iris: Pipeline, iris_model: Path) -> None:
    triton = httpclient.InferenceServerClient(gateway.http_addr)
    headers = {"Authorization": bearer()["authorization"]}
    # A copy per infer(): tritonclient.http adds its Inference-Header-Content-Length to the dict it is given.
    assert triton.is_server_live()  # liveness needs no token
    assert triton.is_server_ready(headers=headers)
    assert not triton.is_server_ready()
    assert triton.is_model_ready(PIPELINE, headers=headers)
    assert not triton.is_model_ready("no-such-pipeline", headers=headers)
    metadata = triton.get_model_metadata(PIPELINE, headers=headers)
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]

    x = features(5, seed=4)
    label, probabilities = direct(iris_model, x)
    for binary in (True, False):  # tritonclient's default is the binary tensor extension
        tensor = httpclient.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")
        ]
        result = triton.infer(PIPELINE, [tensor], outputs=outputs, headers=dict(headers))
        np.testing.assert_array_equal(result.as_numpy("label"), label)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    tensor = httpclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    only_label = triton.infer(
        PIPELINE, [tensor], outputs=[httpclient.InferRequestedOutput("label")], headers=dict(headers)
    )
    assert only_label.as_numpy("probabilities") is None
    np.testing.assert_array_equal(only_label.as_numpy("label"), label)


def test_plain_rest(gateway: Gateway, iris: Pipeline, iris_model: Path) -> None:
    url = gateway.http_url
    before = {outcome: counter(gateway, outcome) for outcome in ("ok", "invalid_argument")}
    unknown_before = counter(gateway, "not_found", pipeline="")
    assert get(f"{url}/v2/health/live") == (200, {"live": True})
    assert get(f"{url}/v2")[1]["name"] == "joey"
    status, ready = get(f"{url}/v2/models/{PIPELINE}/ready")
    assert (status, ready["ready"]) == (200, True)

    x = features(3, seed=5)
    body = {
        "id": "abc",
        "inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}],
    }
    status, reply = post(f"{url}/v2/models/{PIPELINE}/infer", body)
    assert status == 200, reply
    assert reply["id"] == "abc" and reply["model_name"] == PIPELINE
    outputs = {o["name"]: o for o in reply["outputs"]}
    label, _ = direct(iris_model, x)
    assert outputs["label"]["shape"] == [3] and outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == label.tolist()
    assert outputs["probabilities"]["shape"] == [3, 3]

    version = reply["model_version"]
    status, _ = post(f"{url}/v2/models/{PIPELINE}/versions/{version}/infer", body)
    assert status == 200

    # Three features per row where the model takes four: refused by the gateway as a 400.
    bad = {"inputs": [{"name": "features", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}
    status, reply = post(f"{url}/v2/models/{PIPELINE}/infer", bad)
    assert status == 400, reply
    assert "features" in reply["error"] and PIPELINE in reply["error"]

    status, reply = post(f"{url}/v2/models/no-such-pipeline/infer", body)
    assert status == 404 and "no-such-pipeline" in reply["error"]
    status, reply = get(f"{url}/v2/models/no-such-pipeline")
    assert status == 404

    wrong_count = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3]}]}
    status, reply = post(f"{url}/v2/models/{PIPELINE}/infer", wrong_count)
    assert status == 400 and "8 elements" in reply["error"]

    # Two answered, two refused (the engine's reason, the element count); one unknown model.
    assert counter(gateway, "ok") == before["ok"] + 2
    assert counter(gateway, "invalid_argument") == before["invalid_argument"] + 2
    assert counter(gateway, "not_found", pipeline="") == unknown_before + 1


def test_an_idle_pipelines_reader_is_closed_and_its_next_request_opens_one(
    gateway: Gateway, iris: Pipeline, iris_model: Path
) -> None:
    x = features(2, seed=9)
    body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}]}
    label, _ = direct(iris_model, x)
    for _ in range(2):
        status, reply = post(f"{gateway.http_url}/v2/models/{PIPELINE}/infer", body)
        assert status == 200, reply
        assert {o["name"]: o["data"] for o in reply["outputs"]}["label"] == label.tolist()
        assert reply_readers(gateway) >= 1
        wait_until(lambda: reply_readers(gateway) == 0, 30, "the idle reader to be closed", interval=0.2)


def test_anonymous_and_bad_tokens_are_refused(gateway: Gateway, iris: Pipeline) -> None:
    """Every route but liveness needs a valid token: 401 naming the Bearer scheme on REST, UNAUTHENTICATED
    on gRPC; the gateway's own environment (which holds the admin's JOEY_TOKEN here) lends it none."""
    url = gateway.http_url
    unauthenticated_before = counter(gateway, "unauthenticated", pipeline="")
    body = {
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]
    }
    routes = [
        ("/v2", None),
        ("/v2/health/ready", None),
        (f"/v2/models/{PIPELINE}", None),
        (f"/v2/models/{PIPELINE}/ready", None),
        ("/v2/models/no-such-pipeline", None),
        ("/v2/models/not..a-name", None),
        (f"/v2/models/{PIPELINE}/infer", body),
    ]
    for headers in ({}, bearer("joey_not-a-token"), {"Authorization": "Basic YWRtaW46YWRtaW4="}):
        for path, sent in routes:
            answer = call(url + path, sent, headers)
            assert answer.status == 401, (path, headers, answer.document)
            assert answer.headers["WWW-Authenticate"] == 'Bearer realm="joey"'
    assert call(f"{url}/v2/health/live", headers={}).document == {"live": True}
    assert counter(gateway, "unauthenticated", pipeline="") == unauthenticated_before + 3

    x = features(1, seed=8)
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    triton = grpcclient.InferenceServerClient(gateway.grpc_addr)
    assert triton.is_server_live()
    for headers in ({}, bearer("joey_not-a-token"), {"authorization": "Token abc"}):
        calls: list[tuple[str, tuple[Any, ...]]] = [
            ("is_server_ready", ()),
            ("get_server_metadata", ()),
            ("is_model_ready", (PIPELINE,)),
            ("get_model_metadata", (PIPELINE,)),
            ("infer", (PIPELINE, [tensor])),
        ]
        for method, args in calls:
            with pytest.raises(InferenceServerException) as refused:
                getattr(triton, method)(*args, headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED", (method, headers)


def test_members_infer_and_others_learn_nothing(
    gateway: Gateway,
    settings: CommonSettings,
    iris_model: Path,
    workspace: tuple[str, Person],
    new_person: Callable[[], Person],
    admin_stub: Stub,
) -> None:
    """A pipeline of a workspace of its own, served as `<workspace>.<pipeline>`: its owner, a collaborator and
    the platform admin infer; a non-member is told the workspace does not exist, as for one that does not.
    A revoked token and a deactivated user are refused once the gateway's one-second answer expires."""
    name, owner = workspace
    collaborator, stranger = new_person(), new_person()
    owner.stub.AddWorkspaceMember(
        pb.AddWorkspaceMemberRequest(workspace=name, username=collaborator.username)
    )
    sdk = Client(settings=settings, workspace=name, token=owner.token)
    pipeline = sdk.build_pipeline("iris-ws").add_model_step(sdk.upload_model("iris-ws", iris_model))
    pipeline.deploy(replicas=1, timeout=90)
    model = f"{name}.iris-ws"
    x = features(2, seed=9)
    label, _ = direct(iris_model, x)
    body = {"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}]}
    triton = grpcclient.InferenceServerClient(gateway.grpc_addr)

    def rest_infer(token: str) -> Answer:
        return call(f"{gateway.http_url}/v2/models/{model}/infer", body, bearer(token))

    def grpc_infer(token: str) -> np.ndarray:
        tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return triton.infer(model, [tensor], headers=bearer(token)).as_numpy("label")

    try:
        for person in (owner, collaborator):
            answer = rest_infer(person.token)
            assert answer.status == 200, answer.document
            assert answer.document["outputs"][0]["data"] == label.tolist()
            np.testing.assert_array_equal(grpc_infer(person.token), label)
            assert triton.is_model_ready(model, headers=bearer(person.token))
        np.testing.assert_array_equal(grpc_infer(os.environ["JOEY_TOKEN"]), label)

        # The stranger holds a valid token (server routes pass) but learns nothing of the workspace.
        assert call(f"{gateway.http_url}/v2/health/ready", headers=bearer(stranger.token)).status == 200
        missing = call(f"{gateway.http_url}/v2/models/gw-missing.iris-ws/infer", body, bearer(stranger.token))
        assert (missing.status, missing.document) == (404, {"error": "workspace 'gw-missing' not found"})
        for path, sent in ((f"/v2/models/{model}/infer", body), (f"/v2/models/{model}", None)):
            answer = call(gateway.http_url + path, sent, bearer(stranger.token))
            assert (answer.status, answer.document) == (404, {"error": f"workspace {name!r} not found"})
        with pytest.raises(InferenceServerException) as hidden:
            grpc_infer(stranger.token)
        assert hidden.value.status() == "StatusCode.NOT_FOUND"
        assert hidden.value.message() == f"workspace {name!r} not found"

        collaborator.stub.RevokeToken(pb.RevokeTokenRequest(name="tests"))
        wait_until(lambda: rest_infer(collaborator.token).status == 401, 30, "the revoked token refused")
        admin_stub.SetUserActive(pb.SetUserActiveRequest(username=owner.username, active=False))

        def owner_refused() -> bool:
            try:
                grpc_infer(owner.token)
            except InferenceServerException as exc:
                return exc.status() == "StatusCode.UNAUTHENTICATED"
            return False

        wait_until(owner_refused, 30, "the deactivated owner refused")
    finally:
        admin_stub.SetUserActive(pb.SetUserActiveRequest(username=owner.username, active=True))
        pipeline.undeploy()


def test_a_request_without_the_batch_dimension_is_refused_once(gateway: Gateway, iris: Pipeline) -> None:
    """Shape [4] for a model taking [-1, 4]: one 400 / INVALID_ARGUMENT naming both shapes, and no record
    reaches the pipeline (rows of the batch dimension would each have failed alone in the log)."""
    refused = [9.125, 8.125, 7.125, 6.125]
    body = {"inputs": [{"name": "features", "shape": [4], "datatype": "FP32", "data": refused}]}
    status, reply = post(f"{gateway.http_url}/v2/models/{PIPELINE}/infer", body)
    assert status == 400, reply
    assert reply["error"].startswith(
        f"pipeline {PIPELINE!r} input 'features' has shape [4], expected [-1, 4]: the first dimension is "
        "the batch, one row per record; add the batch dimension: shape [1, 4] for one record"
    )

    triton = triton_grpc(gateway)
    tensor = grpcclient.InferInput("features", [4], "FP32")
    tensor.set_data_from_numpy(np.array(refused, dtype=np.float32))
    with pytest.raises(InferenceServerException) as error:
        triton.infer(PIPELINE, [tensor])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "has shape [4], expected [-1, 4]" in error.value.message()

    # A request sent after the refused ones is logged; none of the refused values ever were.
    sentinel = [4.875, 3.125, 1.625, 0.375]
    body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [sentinel]}]}
    assert post(f"{gateway.http_url}/v2/models/{PIPELINE}/infer", body)[0] == 200
    logged: list[object] = []

    def sentinel_logged() -> bool:
        logged[:] = iris.logs(limit=1000)["in.features"].tolist()
        return sentinel in logged

    wait_until(sentinel_logged, 60, "the request after the refused ones in the inference log")
    assert not [value for value in logged if value in refused]


def test_deadline_exceeded_is_answered_and_reported(gateway: Gateway, iris: Pipeline) -> None:
    """A caller's 1 ms timeout expires before any replica reaches the record: the caller gets 504 /
    DEADLINE_EXCEEDED, and the engine drops the expired record with a failure in the inference log."""
    x = features(1, seed=6)
    body = {
        "parameters": {"timeout": 1000},  # microseconds, as tritonclient sends it
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}],
    }
    status, reply = post(f"{gateway.http_url}/v2/models/{PIPELINE}/infer", body)
    assert status == 504, reply
    assert "deadline exceeded" in reply["error"]

    triton = triton_grpc(gateway)
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as expired:
        triton.infer(PIPELINE, [tensor], timeout=1000)
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"

    def dropped() -> int:
        logs = iris.logs(limit=50, valid=False)
        return int(logs["error"].str.startswith("deadline exceeded").sum()) if len(logs) else 0

    wait_until(lambda: dropped() >= 2, 60, "both expired records reported in the inference log")


def test_requests_in_flight_survive_an_engine_crash(
    gateway: Gateway,
    client: Client,
    stack: Stack,
    service_factory: Callable[..., ServiceProcess],
    iris_model: Path,
) -> None:
    """Synchronous calls keep flowing while the engine's consumer group rebalances: a second engine
    runs one of two replicas and is killed mid-load, its partitions go to a replica the first engine
    starts. Every call is answered correctly, including those in flight on the killed replica."""
    instance = f"gw-engine-{secrets.token_hex(3)}"
    second = service_factory("engine", JOEY_INSTANCE_ID=instance)
    # Deployed once both engines are live, each takes its fair share: one replica.
    wait_service_ready(stack.env, "engine", count=2)
    model = client.upload_model("iris-rb", iris_model)
    pipeline = client.build_pipeline("iris-rb").add_model_step(model)
    status = pipeline.deploy(replicas=2, timeout=90)
    owners = sorted(r.replica_id for r in status.replicas if r.alive)
    assert len(owners) == 2 and any(o.startswith(instance) for o in owners), owners

    x = features(4, seed=7)
    label, _ = direct(iris_model, x)
    stop = threading.Event()
    calls: list[tuple[float, float]] = []
    failures: list[str] = []

    def load() -> None:
        triton = triton_grpc(gateway)
        while not stop.is_set():
            tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            started = time.monotonic()
            try:
                result = triton.infer("iris-rb", [tensor])
                if result.as_numpy("label").tolist() != label.tolist():
                    failures.append(f"wrong labels {result.as_numpy('label')}")
                calls.append((started, time.monotonic()))
            except InferenceServerException as exc:
                failures.append(f"{exc.status()}: {exc.message()}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: failures or len(calls) >= 20, 60, "load flowing")
        second.kill9()
        killed_at = time.monotonic()

        def taken_over() -> bool:
            current = pipeline.status()
            live = [r for r in current.replicas if r.alive and r.partitions]
            return (
                current.ready and len(live) == 2 and not any(r.replica_id.startswith(instance) for r in live)
            )

        wait_until(taken_over, 90, "the first engine to take over the killed engine's replica", interval=0.2)
        after = len(calls)
        wait_until(lambda: failures or len(calls) >= after + 50, 60, "load after the takeover")
    finally:
        stop.set()
        for thread in threads:
            thread.join(150)
        pipeline.undeploy()
    assert failures == []
    # Undeployed, the pipeline is refused as unavailable (once the gateway's short status cache expires).
    body = {"inputs": [{"name": "features", "shape": [4, 4], "datatype": "FP32", "data": x.tolist()}]}
    wait_until(lambda: post(f"{gateway.http_url}/v2/models/iris-rb/infer", body)[0] == 503, 30, "a 503")
    assert "not deployed" in post(f"{gateway.http_url}/v2/models/iris-rb/infer", body)[1]["error"]
    in_flight = [c for c in calls if c[0] < killed_at < c[1]]
    assert in_flight, "calls in flight when the engine was killed were answered"
    log.info(
        "%d calls answered, %d in flight at the kill, the longest took %.1f s",
        len(calls),
        len(in_flight),
        max(end - start for start, end in in_flight),
    )


def deadline_of_record(settings: CommonSettings, features: list[float]) -> float:
    """The deadline-ms header of the input record the gateway wrote for a row of ``features``."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        inputs = topics.pipeline_topics("default", PIPELINE).inputs
        partitions = consumer.list_topics(inputs, timeout=10).topics[inputs].partitions
        consumer.assign([TopicPartition(inputs, p, OFFSET_BEGINNING) for p in partitions])
        wanted = dumps({"features": features})
        found: list[float] = []

        def read() -> bool:
            for message in consumer.consume(500, 0.5):
                if message.error() is None and message.value() == wanted:
                    found.append(float(header_value(message.headers(), DEADLINE_HEADER) or "nan"))
            return bool(found)

        wait_until(read, 30, "the gateway's input record")
        return found[0]
    finally:
        consumer.close()


def test_callers_deadlines_travel_with_the_records(
    gateway: Gateway, iris: Pipeline, settings: CommonSettings
) -> None:
    """The gateway's default is 120 s here; a gRPC deadline of 5 s and a REST timeout of 7 s win."""
    grpc_row = [7.125, 3.25, 5.5, 1.75]
    x = np.array([grpc_row], dtype=np.float32)
    tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    sent_ms = time.time() * 1000
    triton_grpc(gateway).infer(PIPELINE, [tensor], client_timeout=5.0)
    answered_ms = time.time() * 1000
    assert sent_ms + 3000 < deadline_of_record(settings, grpc_row) <= answered_ms + 5000

    rest_row = [6.125, 2.25, 4.5, 1.5]
    body = {
        "parameters": {"timeout": 7_000_000},
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [rest_row]}],
    }
    sent_ms = time.time() * 1000
    assert post(f"{gateway.http_url}/v2/models/{PIPELINE}/infer", body)[0] == 200
    answered_ms = time.time() * 1000
    assert sent_ms + 5000 < deadline_of_record(settings, rest_row) <= answered_ms + 7000


def test_a_body_without_a_usable_length_is_refused_unread(gateway: Gateway) -> None:
    """Content-Length -1 once made the server read until the client hung up, before asking who it was."""
    host, port = gateway.http_addr.rsplit(":", 1)

    def post(headers: str) -> str:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v2/models/{PIPELINE}/infer HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            # The connection stays open and nothing more is sent: an answer proves nothing was waited for.
            return sock.recv(65536).decode(errors="replace").split("\r\n", 1)[0]

    # A malformed length is refused by the HTTP parser, before anything else.
    assert post("Content-Length: -1\r\n") == "HTTP/1.1 400 Bad Request"
    token = bearer()["authorization"]
    assert post(f"Authorization: {token}\r\nContent-Length: -1\r\n") == "HTTP/1.1 400 Bad Request"
    assert post(f"Authorization: {token}\r\nContent-Length: 1e3\r\n") == "HTTP/1.1 400 Bad Request"
    assert post(f"Authorization: {token}\r\n") == "HTTP/1.1 400 Bad Request"
    assert post("") == "HTTP/1.1 401 Unauthorized"


# The records endpoint (Wallaroo's): records in, the SDK's result rows out, in JSON or Arrow IPC.

JSON = "application/json"
ARROW_FILE = "application/vnd.apache.arrow.file"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
# Differ between two runs of the same records: when and where each was answered.
PER_RUN = {"time", "request_id", "metadata.partition", "metadata.offset", "metadata.elapsed_ns"}


@dataclass
class Raw:
    status: int
    body: bytes
    content_type: str

    def error(self) -> str:
        return str(json.loads(self.body)["error"])


def post_records(
    gateway: Gateway,
    body: bytes,
    content_type: str | None = JSON,
    path: str = f"/pipelines/default/{PIPELINE}/infer",
    headers: dict[str, str] | None = None,
) -> Raw:
    sent = {**(bearer() if headers is None else headers)}
    if content_type is not None:
        sent["Content-Type"] = content_type
    request = urllib.request.Request(gateway.http_url + path, data=body, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Raw(response.status, response.read(), response.headers["Content-Type"])
    except urllib.error.HTTPError as exc:
        return Raw(exc.code, exc.read(), exc.headers["Content-Type"])


def comparable(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows without what differs between runs, lists and arrays alike."""
    rows = frame.drop(columns=[c for c in frame.columns if c in PER_RUN]).to_dict(orient="records")
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()} for row in rows]


def ipc(table: pa.Table, content_type: str, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_file if content_type == ARROW_FILE else pa.ipc.new_stream
    with writer(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as out:
        out.write_table(table)
    return bytes(sink.getvalue())


def read_ipc(body: bytes, content_type: str) -> pa.Table:
    source = pa.BufferReader(body)
    reader = pa.ipc.open_file(source) if content_type == ARROW_FILE else pa.ipc.open_stream(source)
    return reader.read_all()


def test_json_records_answer_the_sdks_rows(gateway: Gateway, iris: Pipeline, iris_model: Path) -> None:
    """What DataFrame.to_json(orient="records") writes, posted as JSON: the SDK's pipeline.infer rows for
    the same records, the same columns in the same order and the same values; a record the engine refuses
    is a row with its error, like the SDK's, inside a 200."""
    x = features(4, seed=21)
    sent = pd.DataFrame({"features": x.tolist()})
    sent.loc[2, "features"] = [1.0, 2.0]  # two features where the model takes four
    body = sent.to_json(orient="records").encode()
    frame = pd.DataFrame(json.loads(body))  # the records as posted: to_json rounds to 10 digits
    ok_before = counter(gateway, "ok")
    for content_type in (JSON, "application/json; format=pandas-records"):
        answer = post_records(gateway, body, content_type)
        assert answer.status == 200, answer.body
        assert answer.content_type == JSON
        rows = json.loads(answer.body)
        assert isinstance(rows, list) and len(rows) == 4
        sdk = iris.infer(frame)
        assert isinstance(sdk, pd.DataFrame)
        assert list(rows[0]) == list(sdk.columns)
        assert all(pd.Timestamp(row["time"]).tzinfo is not None for row in rows)
        got = [{k: v for k, v in row.items() if k not in PER_RUN} for row in rows]
        assert got == comparable(sdk.astype(object).where(sdk.notna(), None))
        label, _ = direct(iris_model, np.array(frame["features"][[0, 1, 3]].tolist(), dtype=np.float32))
        assert [rows[i]["out.label"] for i in (0, 1, 3)] == label.tolist()
        assert [row["error"] is None for row in rows] == [True, True, False, True]
        assert "features" in rows[2]["error"] and rows[2]["error"] == sdk["error"][2]
    assert counter(gateway, "ok") == ok_before + 2


@pytest.mark.parametrize("content_type", [ARROW_FILE, ARROW_STREAM])
def test_arrow_ipc_answers_the_sdks_table(gateway: Gateway, iris: Pipeline, content_type: str) -> None:
    """An Arrow IPC table, one row per record, is answered in the same IPC format with the table the SDK's
    pipeline.infer returns for it: the same schema and the same values, a record the engine refuses being
    a row with its error (its outputs null) in the table."""
    rows = features(3, seed=22).tolist()
    rows[1] = [1.0, 2.0]  # two features where the model takes four
    table = pa.table({"features": pa.array(rows, pa.list_(pa.float32()))})
    answer = post_records(gateway, ipc(table, content_type), content_type)
    assert answer.status == 200, answer.body
    assert answer.content_type == content_type
    got = read_ipc(answer.body, content_type)
    sdk = iris.infer(table)
    assert isinstance(sdk, pa.Table)
    assert got.schema.equals(sdk.schema)
    assert comparable(got.to_pandas()) == comparable(sdk.to_pandas())
    errors = got.column("error").to_pylist()
    assert [e is None for e in errors] == [True, False, True] and "features" in errors[1]


def test_bad_bodies_are_refused_naming_the_problem(gateway: Gateway, iris: Pipeline) -> None:
    unread_before = counter(gateway, "invalid_argument", pipeline="")
    unsupported_before = counter(gateway, "unsupported_media_type", pipeline="")
    refused_before = counter(gateway, "invalid_argument")
    unsupported_of_pipeline = counter(gateway, "unsupported_media_type")
    cases: list[tuple[bytes, str | None, int, str]] = [
        (b'{"features": [5.1, 3.5, 1.4, 0.2]}', JSON, 400, "must be a JSON list of records"),
        (b'[{"features": [5.1, 3.5, 1.4, 0.2]}, [1, 2]]', JSON, 400, "record 1 of the body is a JSON list"),
        (b"[{", JSON, 400, "not valid JSON"),
        (b"[]", JSON, 400, "holds no records"),
        (b"not arrow at all", ARROW_FILE, 400, "not an Arrow IPC file"),
        (b"not arrow at all", ARROW_STREAM, 400, "not an Arrow IPC stream"),
        (b'[{"sepal": 1.0}]', "application/json; format=split", 415, "pandas records"),
        (b"<xml/>", "application/xml", 415, "application/vnd.apache.arrow.file"),
        (b"[]", None, 415, "Content-Type"),
        # Python's json refuses integers of over 4300 digits with a plain ValueError.
        (
            b'[{"features": ' + b"9" * 5000 + b"}]",
            JSON,
            400,
            "not valid JSON: Exceeds the limit (4300 digits)",
        ),
    ]
    # Compressed batches and dictionaries would take many times the body's size once decoded: refused.
    table = pa.table({"features": pa.array([[5.1, 3.5, 1.4, 0.2]] * 3, pa.list_(pa.float32()))})
    labelled = table.append_column("label", pa.array(["setosa"] * 3).dictionary_encode())
    for content_type in (ARROW_FILE, ARROW_STREAM):
        cases.append((ipc(table, content_type, "zstd"), content_type, 415, "record batches are compressed"))
        cases.append((ipc(labelled, content_type), content_type, 415, "column 'label' is dictionary-encoded"))
    for body, content_type, status, words in cases:
        answer = post_records(gateway, body, content_type)
        assert (answer.status, words in answer.error()) == (status, True), (body, answer.body)
    # Three feature columns for a vector of four: refused whole with the SDK's advice, nothing sent.
    columns = pd.DataFrame(features(2, seed=23)[:, :3], columns=["a", "b", "c"])
    answer = post_records(gateway, columns.to_json(orient="records").encode())
    assert answer.status == 400
    assert answer.error().startswith(
        f"pipeline {PIPELINE!r} reads record field 'features' (float32 [4]), and the frame has 3 columns "
        "('a', 'b', 'c'): pass exactly 4 numeric columns, which are packed into 'features'"
    )
    answer = post_records(gateway, b"[{}]", path=f"/pipelines/default/{PIPELINE}/infer?timeout=soon")
    assert answer.status == 400 and "timeout must be a positive number" in answer.error()
    # Refused before the body was read (content type, timeout): counted without a pipeline; the bodies the
    # pipeline's request decoded: of the pipeline.
    assert counter(gateway, "invalid_argument", pipeline="") == unread_before + 1
    assert counter(gateway, "unsupported_media_type", pipeline="") == unsupported_before + 3
    assert counter(gateway, "unsupported_media_type") == unsupported_of_pipeline + 4
    assert counter(gateway, "invalid_argument") == refused_before + 8
    # The OIP's JSON is read alike.
    digits = (
        b'{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ['
        + b"9" * 5000
        + b"]}]}"
    )
    answer = post_records(gateway, digits, path=f"/v2/models/{PIPELINE}/infer")
    assert (answer.status, "Exceeds the limit (4300 digits)" in answer.error()) == (400, True), answer.body


@pytest.mark.parametrize("content_type", [JSON, ARROW_STREAM])
def test_feature_columns_are_packed_as_the_sdk_packs_them(
    gateway: Gateway, iris: Pipeline, content_type: str
) -> None:
    """A frame of one column per feature (what a Wallaroo user posts): naming none of the pipeline's inputs,
    its four numeric columns are packed into the vector input 'features', in column order, as the SDK's
    pipeline.infer packs the same frame."""
    x = features(3, seed=24)
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    frame = pd.DataFrame(x.astype(np.float64), columns=names)
    if content_type == JSON:
        body = frame.to_json(orient="records", double_precision=15).encode()
        frame = pd.DataFrame(json.loads(body))
    else:
        body = ipc(pa.Table.from_pandas(frame, preserve_index=False), content_type)
    answer = post_records(gateway, body, content_type)
    assert answer.status == 200, answer.body
    sdk = iris.infer(frame)
    assert isinstance(sdk, pd.DataFrame)
    if content_type == JSON:
        got = [{k: v for k, v in row.items() if k not in PER_RUN} for row in json.loads(answer.body)]
    else:
        got = comparable(read_ipc(answer.body, content_type).to_pandas())
    assert got == comparable(sdk.astype(object).where(sdk.notna(), None))
    assert [row["in.features"] for row in got] == frame.to_numpy().tolist()
    assert all(row["error"] is None for row in got)


def test_records_of_unknown_or_undeployed_pipelines_and_strangers_are_refused(
    gateway: Gateway,
    client: Client,
    iris: Pipeline,
    iris_model: Path,
    workspace: tuple[str, Person],
    new_person: Callable[[], Person],
) -> None:
    body = json.dumps([{"features": [5.1, 3.5, 1.4, 0.2]}]).encode()
    for headers in ({}, bearer("joey_not-a-token")):
        answer = post_records(gateway, body, headers=headers)
        assert answer.status == 401, answer.body
    answer = post_records(gateway, body, path="/pipelines/default/no-such-pipeline/infer")
    assert answer.status == 404 and "no-such-pipeline" in answer.error()
    # Each path segment is one name: a dot in the pipeline's separates no workspace (as in OIP's model names).
    answer = post_records(gateway, body, path="/pipelines/default/a.b/infer")
    assert answer.status == 404
    assert answer.error().startswith("pipeline 'a.b' of workspace 'default': invalid pipeline name 'a.b'")
    # Created, never deployed: nothing serves that address.
    idle = client.build_pipeline("iris-idle").add_model_step(client.upload_model("iris-idle", iris_model))
    idle.create()
    answer = post_records(gateway, body, path="/pipelines/default/iris-idle/infer")
    assert (answer.status, "not deployed" in answer.error()) == (404, True), answer.body
    # A valid token of someone who is no member of the workspace learns nothing of it.
    name, owner = workspace
    stranger = new_person()
    for ws in (name, "gw-missing"):
        answer = post_records(
            gateway, body, path=f"/pipelines/{ws}/{PIPELINE}/infer", headers=bearer(stranger.token)
        )
        assert (answer.status, answer.error()) == (404, f"workspace {ws!r} not found")
    answer = post_records(gateway, body, headers=bearer(stranger.token))
    assert (answer.status, answer.error()) == (404, "workspace 'default' not found")
    # Revoked, the token is let in on the registry's cached "yes" only until it expires (JOEY_AUTH_CACHE_S):
    # then the registry is asked again, and refuses it.
    stranger.stub.RevokeToken(pb.RevokeTokenRequest(name="tests"))
    wait_until(
        lambda: post_records(gateway, body, headers=bearer(stranger.token)).status == 401,
        30,
        "the revoked token refused",
    )
