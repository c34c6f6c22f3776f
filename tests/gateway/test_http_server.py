"""The gateway's limits, each tried against the real server as a hostile client would: lying and malformed
Content-Length, headers sent slowly, a body that never ends, 20 MB of garbage, shapes of a million empty
rows, a row too large for Kafka, and one saturated pipeline beside a healthy one. Each time the server answers
(or cuts the client off) without waiting on it, and keeps serving everyone else. Then schemathesis drives the
REST API from the gateway's own OpenAPI document."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import schemathesis
import tritonclient.grpc as grpcclient
import uvicorn
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from tritonclient.utils import InferenceServerException

from joey.client import Client, Pipeline
from joey_core import topics
from joey_core.settings import CommonSettings
from joey_gateway.http_server import HttpServer, _protocol
from tests.conftest import ServiceProcess, Stack, free_port, wait_service_ready, wait_until

MAX_BYTES = 8 << 20
MESSAGE_MAX_BYTES = 200_000
MAX_ELEMENTS = 100_000
CONCURRENCY = 2

# Sleeps on a row whose first feature is 777: its requests stay in flight until the engine's step timeout.
SLOW_STEP = """
import time

def process_data(inputs):
    if (inputs["features"][:, 0] == 777).any():
        time.sleep(3600)
    return {"features": inputs["features"]}
"""

TEXT_STEP = """
def process_data(inputs):
    return {"text": inputs["text"]}
"""
SLOW_PIPELINE = "slow-limits"
SLOW_TOO = "slow-limits-too"
TEXT_PIPELINE = "text-limits"
ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass
class Limited:
    process: ServiceProcess
    host: str
    port: int
    grpc_addr: str
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def bearer() -> dict[str, str]:
    return {"authorization": f"Bearer {os.environ['JOEY_TOKEN']}"}


@pytest.fixture(scope="module")
def limited(stack: Stack, service_factory: Callable[..., ServiceProcess]) -> Limited:
    grpc_addr, http_port, metrics_port = f"127.0.0.1:{free_port()}", free_port(), free_port()
    process = service_factory(
        "gateway",
        JOEY_INSTANCE_ID=f"gateway-limits-{secrets.token_hex(3)}",
        JOEY_OIP_GRPC_ADDR=grpc_addr,
        JOEY_OIP_HTTP_ADDR=f"127.0.0.1:{http_port}",
        JOEY_METRICS_PORT=str(metrics_port),
        JOEY_MAX_REQUEST_BYTES=str(MAX_BYTES),
        JOEY_MAX_ROWS="1000",
        JOEY_MAX_ELEMENTS=str(MAX_ELEMENTS),
        JOEY_HEADER_TIMEOUT_S="1",
        JOEY_BODY_TIMEOUT_S="2",
        JOEY_PIPELINE_CONCURRENCY=str(CONCURRENCY),
        # Two slow pipelines fill the inference workers: health and metadata must still be answered.
        JOEY_HTTP_WORKERS=str(2 * CONCURRENCY),
        JOEY_GRPC_WORKERS=str(2 * CONCURRENCY),
        JOEY_WORKER_WAIT_S="1",
        JOEY_KAFKA_CONFIG=json.dumps({"message.max.bytes": MESSAGE_MAX_BYTES}),
    )
    wait_service_ready(stack.env, "gateway")
    wait_until(lambda: _status(f"http://127.0.0.1:{http_port}/v2/health/live") == 200, 30, "REST up")
    return Limited(process, "127.0.0.1", http_port, grpc_addr, metrics_port)


@pytest.fixture(scope="module")
def client(stack: Stack, settings: CommonSettings) -> Client:
    return Client(settings=settings)


@pytest.fixture(scope="module")
def slow(client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    step = tmp_path_factory.mktemp("slow") / "slow.py"
    step.write_text(SLOW_STEP)
    features = {"features": ("float32", (-1, 4))}
    client.upload_model(
        SLOW_PIPELINE, step, framework="python", input_schema=features, output_schema=features
    )
    pipeline = client.build_pipeline(SLOW_PIPELINE).add_model_step(SLOW_PIPELINE)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


@pytest.fixture(scope="module")
def slow_too(client: Client, slow: Pipeline) -> Iterator[Pipeline]:
    """A second pipeline of the slow step."""
    pipeline = client.build_pipeline(SLOW_TOO).add_model_step(SLOW_PIPELINE)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


@pytest.fixture(scope="module")
def text(client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    step = tmp_path_factory.mktemp("text") / "echo.py"
    step.write_text(TEXT_STEP)
    schema = {"text": ("str", (-1,))}
    client.upload_model(TEXT_PIPELINE, step, framework="python", input_schema=schema, output_schema=schema)
    pipeline = client.build_pipeline(TEXT_PIPELINE).add_model_step(TEXT_PIPELINE)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


@pytest.fixture(scope="module")
def healthy(client: Client, iris_model: Path) -> Iterator[Pipeline]:
    pipeline = client.build_pipeline("iris-limits").add_model_step(
        client.upload_model("iris-limits", iris_model)
    )
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


def _status(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def infer(url: str, model: str, rows: list[list[float]]) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [{"name": "features", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]}
    return answer(url, f"/v2/models/{model}/infer", json.dumps(body).encode())


def answer(url: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + path, data=body, headers={"Content-Type": "application/json", **bearer()}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def records_answer(
    url: str, pipeline: str, body: bytes, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the records endpoint of ``pipeline``; the status and the JSON answer (an error)."""
    request = urllib.request.Request(
        f"{url}/pipelines/default/{pipeline}/infer",
        data=body,
        headers={"Content-Type": content_type, **bearer()},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def raw_exchange(gateway: Limited, head: str, body: bytes = b"") -> str:
    """Send ``head`` (request line and headers, without the blank line) and ``body`` on a socket left open,
    and return the status line of the answer: an answer proves the server waited for nothing more."""
    with socket.create_connection((gateway.host, gateway.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        return sock.recv(65536).decode(errors="replace").split("\r\n", 1)[0]


def infer_head(length: int | str) -> str:
    token = bearer()["authorization"]
    return (
        f"POST /v2/models/iris-limits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
    )


def test_lying_and_malformed_lengths_are_answered_without_waiting(
    limited: Limited, healthy: Pipeline
) -> None:
    assert raw_exchange(limited, infer_head(-1)) == "HTTP/1.1 400 Bad Request"
    assert raw_exchange(limited, infer_head("12abc")) == "HTTP/1.1 400 Bad Request"
    assert raw_exchange(limited, infer_head(10**20)) == "HTTP/1.1 400 Bad Request"  # over h11's 20 digits
    # Larger than the limit: refused before a byte of the body is read.
    assert raw_exchange(limited, infer_head(10**18)) == "HTTP/1.1 413 Request Entity Too Large"
    assert raw_exchange(limited, infer_head(MAX_BYTES + 1)) == "HTTP/1.1 413 Request Entity Too Large"
    # h11 frames a body by Transfer-Encoding over a Content-Length beside it: a small declared length with
    # a chunked body of any size. Refused before a chunk is read, as is a chunked body alone.
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
    chunked = "Transfer-Encoding: chunked\r\n"
    assert raw_exchange(limited, infer_head(10) + chunked, chunk) == "HTTP/1.1 400 Bad Request"
    no_length = infer_head(0).replace("Content-Length: 0\r\n", chunked)
    assert raw_exchange(limited, no_length, chunk) == "HTTP/1.1 400 Bad Request"

    # Claims 100 bytes, sends 10 and waits: answered 400 when the body timeout expires, naming what came.
    with socket.create_connection((limited.host, limited.port), timeout=30) as sock:
        sock.sendall(infer_head(100).encode() + b"\r\n" + b'{"inputs":')
        chunks = []
        while chunk := sock.recv(65536):  # to the end: the server closes a connection whose body it left
            chunks.append(chunk)
        reply = b"".join(chunks).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 400 Bad Request"), reply
    assert "10 of the body's 100 bytes" in reply
    # Shorter than it says: the rest is the next request's garbage, refused as such.
    body = json.dumps({"inputs": []}).encode()
    assert raw_exchange(limited, infer_head(5), body) == "HTTP/1.1 400 Bad Request"
    assert infer(limited.url, "iris-limits", [[5.1, 3.5, 1.4, 0.2]])[0] == 200


def test_twenty_megabytes_of_garbage(limited: Limited, healthy: Pipeline) -> None:
    garbage = np.random.default_rng(1).bytes(20 << 20)
    with socket.create_connection((limited.host, limited.port), timeout=30) as sock:
        sock.sendall(infer_head(len(garbage)).encode() + b"\r\n")
        # Answered before the body is sent: the server reads none of it.
        assert sock.recv(65536).decode(errors="replace").startswith("HTTP/1.1 413")
    status, reply = answer(limited.url, "/v2/models/iris-limits/infer", garbage[: 5 << 20])
    assert status == 400 and "not valid JSON" in reply["error"], reply
    status, reply = infer(limited.url, "iris-limits", [[5.1, 3.5, 1.4, 0.2]])
    assert status == 200, reply


def test_slow_headers_are_cut_off_while_others_are_served(limited: Limited, healthy: Pipeline) -> None:
    """Ten clients send their headers a byte at a time (each byte restarts uvicorn's own keep-alive timer);
    each is disconnected once the header timeout passes, and the server answers others meanwhile."""
    stop = threading.Event()
    closed: list[int] = []

    def slowloris(index: int) -> None:
        with socket.create_connection((limited.host, limited.port), timeout=30) as sock:
            try:
                for byte in (infer_head(10) * 100).encode():
                    sock.sendall(bytes([byte]))
                    if stop.wait(0.1):
                        return
            except OSError:  # reset or broken pipe: the server closed it
                closed.append(index)

    threads = [threading.Thread(target=slowloris, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    try:
        assert infer(limited.url, "iris-limits", [[5.1, 3.5, 1.4, 0.2]])[0] == 200
        wait_until(lambda: len(closed) == len(threads), 60, "every slow client cut off")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert _status(f"{limited.url}/v2/health/live") == 200
    assert limited.process.alive()


def test_slow_headers_of_a_keep_alive_connections_next_request_are_cut_off(limited: Limited) -> None:
    """The header deadline is armed again by each answer: a client served once, then trickling its next
    request's headers a byte at a time, is cut off like a new one."""
    with socket.create_connection((limited.host, limited.port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'{"live":true}' not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 OK"), first
        trickle = iter((infer_head(10) * 100).encode())

        def cut_off() -> bool:
            try:
                sock.sendall(bytes([next(trickle)]))
            except OSError:  # reset or broken pipe: the server closed it
                return True
            return False

        wait_until(cut_off, 60, "the keep-alive connection cut off", 0.1)
    assert _status(f"{limited.url}/v2/health/live") == 200


def test_shapes_of_empty_or_too_many_rows_are_refused(limited: Limited, healthy: Pipeline) -> None:
    for shape, status, message in (
        ([1_000_000, 0], 400, "a dimension of 0 leaves its rows without elements"),
        ([0, 4], 400, "a dimension of 0"),
        ([1001, 4], 413, "1001 rows; a request may hold at most 1000"),
        ([10, 10**12, 10**12], 413, "elements, the most one input may hold"),
    ):
        body = {"inputs": [{"name": "features", "shape": shape, "datatype": "FP32", "data": []}]}
        got, reply = answer(limited.url, "/v2/models/iris-limits/infer", json.dumps(body).encode())
        assert (got, message in reply["error"]) == (status, True), (shape, reply)
    # The records endpoint's rows are its records, JSON or Arrow: counted before any is decoded further.
    records = [{"features": [5.1, 3.5, 1.4, 0.2]}] * 1001
    got, reply = records_answer(limited.url, "iris-limits", json.dumps(records).encode())
    assert (got, reply["error"]) == (413, "the body holds 1001 records; a request may hold at most 1000")
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pylist(records)
    with pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)
    got, reply = records_answer(limited.url, "iris-limits", sink.getvalue().to_pybytes(), ARROW_STREAM)
    assert (got, reply["error"]) == (413, "the body holds 1001 records; a request may hold at most 1000")
    # Their values too: 10 records of 20,000 values each, counted batch by batch for Arrow.
    wide = [{"features": [0.5] * 20_000}] * 10
    table = pa.Table.from_pylist(wide)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as out:
        for batch in table.to_batches(max_chunksize=2):
            out.write_batch(batch)
    for body, content_type in (
        (json.dumps(wide).encode(), "application/json"),
        (sink.getvalue().to_pybytes(), ARROW_STREAM),
    ):
        got, reply = records_answer(limited.url, "iris-limits", body, content_type)
        assert (got, "a request may hold at most 100000" in reply["error"]) == (413, True), reply
    triton = grpcclient.InferenceServerClient(limited.grpc_addr)
    tensor = grpcclient.InferInput("features", [1_000_000, 0], "FP32")
    tensor.set_data_from_numpy(np.zeros((1_000_000, 0), dtype=np.float32))
    with pytest.raises(InferenceServerException) as refused:
        triton.infer("iris-limits", [tensor], headers=bearer())
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def records_on(settings: CommonSettings, topic: str, sentinel: bytes) -> list[bytes]:
    """The values on ``topic`` up to the record holding ``sentinel``."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    values: list[bytes] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

        def read() -> bool:
            values.extend(m.value() for m in consumer.consume(500, 0.5) if m.error() is None)
            return any(sentinel in v for v in values)

        wait_until(read, 30, "the sentinel record")
        return values
    finally:
        consumer.close()


def test_a_row_too_large_for_kafka_refuses_the_whole_request(
    limited: Limited, text: Pipeline, settings: CommonSettings
) -> None:
    """Rows share a shape, so BYTES rows are the ones that differ in size: the second is over the
    producer's message.max.bytes. Refused 413 naming it, and the first row was never produced either."""
    marker = secrets.token_hex(8)
    rows = [f"first-{marker}", "y" * MESSAGE_MAX_BYTES]
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": rows}]}
    status, reply = answer(limited.url, f"/v2/models/{TEXT_PIPELINE}/infer", json.dumps(body).encode())
    assert status == 413, reply
    assert reply["error"].startswith("row 1 of the batch makes a record of"), reply
    assert "nothing was sent" in reply["error"]
    records = json.dumps([{"text": text} for text in rows]).encode()
    status, reply = records_answer(limited.url, TEXT_PIPELINE, records)
    assert (status, reply["error"].startswith("row 1 of the batch makes a record of")) == (413, True), reply
    sentinel = f"sentinel-{marker}"
    single = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [sentinel]}]}
    status, reply = answer(limited.url, f"/v2/models/{TEXT_PIPELINE}/infer", json.dumps(single).encode())
    assert status == 200, reply
    values = records_on(settings, topics.pipeline_topics("default", TEXT_PIPELINE).inputs, sentinel.encode())
    assert not [v for v in values if f"first-{marker}".encode() in v]


def test_a_saturated_pipeline_is_refused_while_another_keeps_serving(
    limited: Limited, healthy: Pipeline, slow: Pipeline
) -> None:
    """The slow pipeline's step sleeps: its CONCURRENCY requests hold their slots, the next is refused at
    once (429 with Retry-After on REST, RESOURCE_EXHAUSTED on gRPC); the healthy one answers throughout."""
    stuck = [[777.0, 1.0, 1.0, 1.0]]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        held = [pool.submit(infer, limited.url, SLOW_PIPELINE, stuck) for _ in range(CONCURRENCY)]
        wait_until(lambda: in_flight(limited, SLOW_PIPELINE) == CONCURRENCY, 60, "the slow pipeline full")
        request = urllib.request.Request(
            f"{limited.url}/v2/models/{SLOW_PIPELINE}/infer",
            data=json.dumps(
                {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": stuck}]}
            ).encode(),
            headers=bearer(),
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 429
        assert refused.value.headers["Retry-After"] == "1"
        assert "already has 2 requests in flight" in json.loads(refused.value.read())["error"]
        # The records endpoint takes the same slots.
        one = json.dumps([{"features": stuck[0]}]).encode()
        status, reply = records_answer(limited.url, SLOW_PIPELINE, one)
        assert (status, "already has 2 requests in flight" in reply["error"]) == (429, True), reply

        triton = grpcclient.InferenceServerClient(limited.grpc_addr)
        tensor = grpcclient.InferInput("features", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array(stuck, dtype=np.float32))
        with pytest.raises(InferenceServerException) as exhausted:
            triton.infer(SLOW_PIPELINE, [tensor], headers=bearer())
        assert exhausted.value.status() == "StatusCode.RESOURCE_EXHAUSTED"

        healthy_rows = [[5.1, 3.5, 1.4, 0.2]]
        for _ in range(3 * CONCURRENCY):
            assert infer(limited.url, "iris-limits", healthy_rows)[0] == 200
            ok = grpcclient.InferInput("features", [1, 4], "FP32")
            ok.set_data_from_numpy(np.array(healthy_rows, dtype=np.float32))
            assert triton.infer("iris-limits", [ok], headers=bearer()).as_numpy("label") is not None
        assert in_flight(limited, SLOW_PIPELINE) == CONCURRENCY  # still held while the others were served
        for future in held:
            status, _ = future.result(timeout=300)  # the engine's step timeout fails them
            assert status != 200
    # Each slot is given back once its request ends: the slow pipeline serves again.
    wait_until(lambda: in_flight(limited, SLOW_PIPELINE) == 0, 60, "the slow pipeline's slots released")
    assert infer(limited.url, SLOW_PIPELINE, [[1.0, 1.0, 1.0, 1.0]])[0] == 200


def test_slow_pipelines_holding_every_worker_leave_health_and_metadata_answered(
    limited: Limited, healthy: Pipeline, slow: Pipeline, slow_too: Pipeline
) -> None:
    """Two slow pipelines, each at its limit, hold every REST inference worker: a third pipeline's request
    waits JOEY_WORKER_WAIT_S and is answered 503, while readiness and metadata (threads of their own) answer
    at once, over REST and gRPC, and gRPC inference (workers of its own) goes on."""
    stuck = [[777.0, 1.0, 1.0, 1.0]]
    pipelines = (SLOW_PIPELINE, SLOW_TOO)
    with ThreadPoolExecutor(2 * CONCURRENCY) as pool:
        held = [pool.submit(infer, limited.url, p, stuck) for p in pipelines for _ in range(CONCURRENCY)]
        for pipeline in pipelines:
            wait_until(lambda p=pipeline: in_flight(limited, p) == CONCURRENCY, 60, f"{pipeline} full")
        status, reply = infer(limited.url, "iris-limits", [[5.1, 3.5, 1.4, 0.2]])
        assert (status, "every gateway worker stayed busy" in reply["error"]) == (503, True), reply
        assert _status(f"{limited.url}/v2/health/ready", headers=bearer()) == 200
        assert _status(f"{limited.url}/v2/models/iris-limits", headers=bearer()) == 200
        triton = grpcclient.InferenceServerClient(limited.grpc_addr)
        assert triton.is_server_ready(headers=bearer())
        ok = grpcclient.InferInput("features", [1, 4], "FP32")
        ok.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        assert triton.infer("iris-limits", [ok], headers=bearer()).as_numpy("label") is not None
        for future in held:
            assert future.result(timeout=300)[0] != 200
    for pipeline in pipelines:
        wait_until(lambda p=pipeline: in_flight(limited, p) == 0, 60, f"{pipeline}'s slots released")
    assert infer(limited.url, "iris-limits", [[5.1, 3.5, 1.4, 0.2]])[0] == 200


def in_flight(gateway: Limited, pipeline: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    series = f'joey_gateway_requests_in_flight{{pipeline="{pipeline}",workspace="default"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


def test_the_rest_api_conforms_to_its_openapi_document(limited: Limited, healthy: Pipeline) -> None:
    """schemathesis generates requests from GET /v2/openapi.json, valid and invalid by the schema, for any
    model name and for the deployed one (a bounded number each), and sends them to the real server: no 5xx,
    and every answer's status, content type and body are as the document describes."""
    schema = schemathesis.openapi.from_url(f"{limited.url}/v2/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    failures: list[str] = []
    runs = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        targets: list[dict[str, Any] | None] = [None]
        names = {parameter.name for parameter in operation.iter_parameters()}
        if "model" in names:
            targets.append({"model": "iris-limits"})
        if "pipeline" in names:
            targets.append({"workspace": "default", "pipeline": "iris-limits"})
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for path_parameters in targets:
                strategy = operation.as_strategy(mode, path_parameters=path_parameters)

                @settings(
                    max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None
                )
                @given(case=strategy)
                def run(case: Any) -> None:
                    # Valid by the schema is no promise of a 2xx (most model names do not exist), and the
                    # protocol's objects take fields of their own, so not all the schema calls invalid is.
                    case.call_and_validate(
                        headers=bearer(),
                        checks=checks,
                        excluded_checks=[positive_data_acceptance, negative_data_rejection],
                    )

                runs += 1
                try:
                    run()
                except Unsatisfiable:
                    # Nothing to make invalid: the operation takes no parameters and no body.
                    assert mode == GenerationMode.NEGATIVE, operation.label
                except Exception as exc:  # noqa: BLE001 - every operation is tried; all failures are reported
                    failures.append(f"{operation.label} {mode.name} {path_parameters}: {exc}")
    assert failures == []
    assert runs >= 20  # every operation of the document was driven
    assert limited.process.alive()


def test_a_rest_server_that_dies_before_serving_is_noticed() -> None:
    """uvicorn ends its thread when it cannot start (here: an application it cannot import): the gateway
    is told instead of beating as ready without REST."""
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config("joey_gateway.no_such_module:app", log_config=None)
    server = HttpServer(uvicorn.Server(config), sock)
    with pytest.raises(RuntimeError, match="stopped before it started serving"):
        server.wait_started()
    assert not server.alive
    sock.close()


def test_answers_are_sent_without_waiting_on_nagles_algorithm() -> None:
    """uvicorn writes an answer's headers and its body apart: on a keep-alive connection without
    TCP_NODELAY the body waits for the client's delayed ACK. The accepted socket has it set, though the
    listening socket (socket.create_server's, as the gateway's) has protocol 0, on which asyncio sets none."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=_protocol(30), lifespan="off", log_config=None))
    http = HttpServer(server, sock)
    http.wait_started()
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
            [connection] = server.server_state.connections
            accepted = connection.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        http.shutdown()
        http.wait()
