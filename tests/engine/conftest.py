"""Engine test fixtures: a stand-in registry serving artifacts over the real gRPC contract, a second
tiny ONNX model for chaining, and engine settings pointing at both."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import onnx
import pytest
import redis
from onnx import TensorProto, helper

from joey_core.v1 import registry_pb2, registry_pb2_grpc
from joey_engine.deployment import Deployment, from_proto
from joey_engine.settings import EngineSettings
from tests.conftest import SHORT_GROUP_SESSION

CHUNK = 1 << 20


class ArtifactServer(registry_pb2_grpc.RegistryServicer):
    """Implements only DownloadArtifact, from a dict sha256 -> bytes (any workspace)."""

    def __init__(self) -> None:
        self.artifacts: dict[str, bytes] = {}
        self.downloads: list[str] = []

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.artifacts[sha] = data
        return sha

    def DownloadArtifact(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        self.downloads.append(request.sha256)
        data = self.artifacts.get(request.sha256)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no artifact {request.sha256}")
        for start in range(0, len(data), CHUNK):
            yield registry_pb2.ArtifactChunk(data=data[start : start + CHUNK])


@pytest.fixture(scope="session")
def artifact_server() -> Iterator[tuple[ArtifactServer, str]]:
    servicer = ArtifactServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def reduce_max_model(directory: Path, input_name: str, output_name: str) -> Path:
    """A model to chain after iris: ``input_name`` float [N, 3] -> row maxima ``output_name`` float [N]."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", [input_name], [output_name], axes=[1], keepdims=0)],
        "reduce-max",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = directory / f"{input_name}-max.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="session")
def max_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Second step chained by name: ``probabilities`` float [N, 3] -> ``max_probability`` float [N]."""
    return reduce_max_model(tmp_path_factory.mktemp("max-model"), "probabilities", "max_probability")


@pytest.fixture(scope="session")
def x_max_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Second step that needs a mapping after iris: ``x`` float [N, 3] -> ``top`` float [N]."""
    return reduce_max_model(tmp_path_factory.mktemp("x-max-model"), "x", "top")


def features_model(
    directory: Path, node: onnx.NodeProto, output: str, output_shape: list[Any], axes: list[int]
) -> Path:
    """A challenger for iris: ``features`` float [N, 4] -> ``output`` float through one reducing ``node``."""
    graph = helper.make_graph(
        [node],
        node.op_type,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        # ReduceSum takes its axes as an input since opset 13: a constant of the graph.
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = directory / f"{node.op_type}-{output}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="session")
def sum_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A challenger taking iris's inputs: ``features`` float [N, 4] -> row sums ``total`` float [N]."""
    node = helper.make_node("ReduceSum", ["features", "axes"], ["total"], keepdims=0)
    return features_model(tmp_path_factory.mktemp("sum-model"), node, "total", ["N"], [1])


@pytest.fixture(scope="session")
def one_row_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A broken challenger: one row for the whole batch (``features`` column sums ``pooled`` [1, 4])."""
    node = helper.make_node("ReduceSum", ["features", "axes"], ["pooled"], keepdims=1)
    return features_model(tmp_path_factory.mktemp("one-row-model"), node, "pooled", [1, 4], [0])


IRIS_INPUTS = [registry_pb2.TensorSpec(name="features", dtype="float32", shape=[-1, 4])]
IRIS_OUTPUTS = [
    registry_pb2.TensorSpec(name="label", dtype="int64", shape=[-1]),
    registry_pb2.TensorSpec(name="probabilities", dtype="float32", shape=[-1, 3]),
]


def iris_step(
    sha256: str,
    model: str = "iris",
    version: int = 1,
    input_mapping: dict[str, str] | None = None,
    challengers: list[registry_pb2.ResolvedStep] | None = None,
) -> registry_pb2.ResolvedStep:
    """Iris as a model step, or as the champion of a shadow step when ``challengers`` are given."""
    return registry_pb2.ResolvedStep(
        model=model,
        version=version,
        sha256=sha256,
        framework="onnx",
        inputs=IRIS_INPUTS,
        outputs=IRIS_OUTPUTS,
        input_mapping=input_mapping,
        challengers=challengers,
    )


def challenger_step(
    model: str, sha256: str = "3" * 64, version: int = 1, **input_mapping: str
) -> registry_pb2.ResolvedStep:
    """A resolved challenger; the runner takes its signature from the loaded model."""
    return registry_pb2.ResolvedStep(
        model=model, version=version, sha256=sha256, framework="onnx", input_mapping=input_mapping
    )


@pytest.fixture(scope="session")
def make_challenger() -> Callable[..., registry_pb2.ResolvedStep]:
    return challenger_step


@pytest.fixture(scope="session")
def make_step() -> Callable[..., registry_pb2.ResolvedStep]:
    return iris_step


def validations_step(**checks: str) -> registry_pb2.ResolvedStep:
    """A resolved validations step, as the registry resolves ``add_validations(**checks)``."""
    return registry_pb2.ResolvedStep(checks=checks)


@pytest.fixture(scope="session")
def make_validations() -> Callable[..., registry_pb2.ResolvedStep]:
    return validations_step


SpecFactory = Callable[..., registry_pb2.DeploymentSpec]


@pytest.fixture(scope="session")
def make_spec() -> SpecFactory:
    """DeploymentSpec of an iris pipeline fed per ``input_mapping``; pass ``steps`` for another chain."""

    def make(
        workspace: str,
        pipeline: str,
        sha256: str = "0" * 64,
        replicas: int = 1,
        version: int = 1,
        steps: list[registry_pb2.ResolvedStep] | None = None,
        input_mapping: dict[str, str] | None = None,
    ) -> registry_pb2.DeploymentSpec:
        return registry_pb2.DeploymentSpec(
            workspace=workspace,
            pipeline=pipeline,
            pipeline_version=version,
            replicas=replicas,
            deployment_id=secrets.token_hex(8),
            steps=steps or [iris_step(sha256, input_mapping=input_mapping)],
        )

    return make


@pytest.fixture(scope="session")
def make_deployment(make_spec: SpecFactory) -> Callable[..., Deployment]:
    def make(**kwargs: Any) -> Deployment:
        return from_proto(make_spec("engine-unit", "unit", **kwargs))

    return make


@pytest.fixture(scope="session")
def engine_workspace() -> str:
    return f"engine-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def engine_settings(
    env: dict[str, str],
    artifact_server: tuple[ArtifactServer, str],
    engine_workspace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> EngineSettings:
    """Settings of an in-process engine that serves only this module's workspace, with Redis keys apart from
    any `joey serve engine` of the session, so the two never share slots or heartbeats."""
    common = {k.removeprefix("JOEY_").lower(): v for k, v in env.items()}
    return EngineSettings(
        **common
        | {
            "registry_addr": artifact_server[1],
            "cache_dir": tmp_path_factory.mktemp("engine-cache"),
            "redis_prefix": f"{env['JOEY_REDIS_PREFIX']}:engine-tests",
            "workspaces": [engine_workspace],
            "heartbeat_interval_s": 0.5,
            "heartbeat_ttl_s": 3.0,
            # A crashed replica restarts after 1 s, then 2, 4...: capped at the first, a test that crashes
            # one again and again (a record killing its replica) waits 1 s for each restart.
            "load_retry_max_s": 1.0,
            "instance_id": f"test-engine-{secrets.token_hex(3)}",
            "kafka_config": SHORT_GROUP_SESSION,
        }
    )


@pytest.fixture(scope="session")
def redis_client(engine_settings: EngineSettings) -> redis.Redis:
    return redis.Redis.from_url(engine_settings.redis_url.get_secret_value())
