"""Helpers shared by the registry tests: uploads, tiny ONNX models, reading joey.deployments."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import onnx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from onnx import TensorProto, helper
from pydantic import SecretStr

from joey_core import topics
from joey_core.kafka import consumer_config
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings

Stub = registry_pb2_grpc.RegistryStub


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call, of any shape."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def token_stub(channel: grpc.Channel, token: str) -> Stub:
    """A stub whose calls carry ``token``."""
    return registry_pb2_grpc.RegistryStub(grpc.intercept_channel(channel, _Bearer(token)))


@dataclass(frozen=True)
class Person:
    """A user of the tests, with an API token and a stub carrying it."""

    username: str
    password: str
    token: str
    stub: Stub


def upload_requests(
    workspace: str, name: str, data: bytes, framework: str = "", chunk: int = 4096
) -> Iterator[pb.UploadModelRequest]:
    yield pb.UploadModelRequest(
        header=pb.UploadModelHeader(workspace=workspace, name=name, framework=framework)
    )
    for start in range(0, len(data), chunk):
        yield pb.UploadModelRequest(chunk=data[start : start + chunk])


def heavy_step() -> bytes:
    """A python step (14 MB) whose parse takes seconds of CPU and gigabytes of syntax tree."""
    lines = "".join(f"x{i} = [{i}, ({i}, {{{i}: {i}}})]\n" for i in range(400_000))
    return f"def process_data(inputs):\n    return inputs\n{lines}".encode()


def upload(stub: Stub, workspace: str, name: str, data: bytes, framework: str = "") -> pb.ModelVersion:
    return stub.UploadModel(upload_requests(workspace, name, data, framework), timeout=30)


def step(model: str, version: int = 0) -> pb.PipelineStep:
    return pb.PipelineStep(model=pb.ModelStep(model=model, version=version))


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "string": TensorProto.STRING}


class Payload:
    """A pickle that runs ``code`` as it loads (in the conversion child), then is the scikit-learn model
    ``m`` of two features that :data:`PAYLOAD_MODEL` fits."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str, dict[str, object]]]:
        return eval, ("[exec(c, g), g['m']][1]", {"c": PAYLOAD_MODEL + self.code, "g": {}})


PAYLOAD_MODEL = """
import numpy as np
from sklearn.linear_model import LinearRegression
m = LinearRegression().fit(np.arange(8.0).reshape(4, 2), np.arange(4.0))
"""


def probe_code(**attempts: str) -> str:
    """Code for :class:`Payload` that tries each expression of ``attempts`` in the conversion child and
    reports what each gave, ``["ok", repr]`` or ``["error", strerror]``, in the refusal it then raises:
    ``PROBED {json}``, read back with :func:`probed`. ``checked(result)`` turns a C call's -1 into an
    OSError; ``libc`` is the C library and ``syscall_number(name)`` resolves a system call's number."""
    tries = "".join(f"attempt({name!r}, lambda: {expression})\n" for name, expression in attempts.items())
    return PROBE + tries + 'raise ValueError("PROBED " + json.dumps(tried))\n'


PROBE = """
import ctypes, json, os, resource
import pyseccomp
tried = {}
libc = ctypes.CDLL(None, use_errno=True)
def syscall_number(name):
    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
def checked(result):
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
def attempt(name, act):
    try:
        tried[name] = ["ok", repr(act())[:300]]
    except OSError as exc:
        tried[name] = ["error", exc.strerror]
"""


def probed(message: str) -> dict[str, list[str]]:
    """What a :func:`probe_code` payload reported in the refusal ``message``."""
    found: dict[str, list[str]] = json.loads(
        message.split("PROBED ", 1)[1].rsplit("; nothing was stored", 1)[0]
    )
    return found


def identity_model(input_name: str, dtype: str, output_name: str, width: int | None = None) -> bytes:
    """A one-node ONNX model passing ``input_name`` through as ``output_name``."""
    shape: list[int | str | None] = ["N"] if width is None else ["N", width]
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], [output_name])],
        "identity",
        [helper.make_tensor_value_info(input_name, _ONNX_TYPES[dtype], shape)],
        [helper.make_tensor_value_info(output_name, _ONNX_TYPES[dtype], shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def read_deployments(
    settings: CommonSettings,
    until: Callable[[list[Message]], bool],
    key: str,
    timeout: float = 20.0,
) -> list[Message]:
    """Records of ``key`` on joey.deployments from the beginning, read until ``until`` holds."""
    consumer = Consumer(consumer_config(settings, f"registry-test-{secrets.token_hex(4)}"))
    consumer.assign([TopicPartition(topics.DEPLOYMENTS, 0, OFFSET_BEGINNING)])
    found: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(found):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out reading {topics.DEPLOYMENTS} for {key}: got {len(found)} records"
                )
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            if msg.key() == key.encode():
                found.append(msg)
    finally:
        consumer.close()
    return found


@contextmanager
def registry_on(settings: RegistrySettings, url: str, admin_password: str) -> Iterator[grpc.Channel]:
    """A registry of its own on the database at ``url``, bootstrapping `admin` there, and a channel to it."""
    server = RegistryServer(
        settings.model_copy(
            update={
                "database_url": SecretStr(url),
                "admin_password": SecretStr(admin_password),
                "redis_prefix": f"{settings.redis_prefix}:own-{secrets.token_hex(4)}",
            }
        )
    )
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop()
