"""Deploying through the SDK against the real stack: refused arguments change nothing, a pipeline without
steps says so, an undeployed pipeline's status is history with no replica alive, and a deploy reports
each step of its replicas' start."""

from __future__ import annotations

import secrets
from pathlib import Path

import pyarrow as pa
import pytest

from joey.client import Autoscale, Client, DeploymentStatus, JoeyError
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack, wait_until

STEPS = Path(__file__).resolve().parents[3] / "examples" / "steps"
FIELDS = ("sepal_length_mm", "sepal_width_mm", "petal_length_mm", "petal_width_mm")


@pytest.fixture
def client(stack: Stack, settings: CommonSettings, iris_model: Path) -> Client:
    client = Client(settings=settings, workspace=f"deploy-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    client.upload_model("iris", iris_model)
    return client


def test_zero_replicas_and_other_bad_numbers_are_refused_and_change_nothing(client: Client) -> None:
    pipeline = client.build_pipeline("p").add_model_step("iris")
    running = pipeline.deploy(replicas=2, timeout=90)
    assert (running.ready, running.replicas_wanted) == (True, 2)

    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"replicas must be a whole number of at least 1, got {bad}"):
            pipeline.deploy(replicas=bad)
    with pytest.raises(ValueError, match="version must be a whole number of at least 1, got 0"):
        pipeline.deploy(version=0)
    with pytest.raises(ValueError, match="min_replicas <= max_replicas, got min 3 and max 2"):
        Autoscale(3, 2)
    with pytest.raises(ValueError, match="got min 0 and max 2"):
        Autoscale(0, 2)
    with pytest.raises(ValueError, match="scale_up_after_s must be a positive number of seconds, got 0"):
        Autoscale(1, 2, scale_up_after_s=0)
    # The registry refuses them too, whoever calls it.
    request = pb.DeployRequest(workspace=client.workspace, pipeline="p", replicas=0)
    with pytest.raises(JoeyError) as refused:
        client.call("Deploy", request)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert refused.value.message.startswith("replicas must be between 1 and 4 ")
    assert "got 0" in refused.value.message
    with pytest.raises(JoeyError, match="cpus must be more than zero, got '0'"):
        pipeline.deploy(cpus=0)

    after = pipeline.status()
    assert (after.deployment_id, after.replicas_wanted, after.ready) == (running.deployment_id, 2, True)
    pipeline.undeploy()


def test_deploying_a_pipeline_without_steps_says_so(client: Client) -> None:
    with pytest.raises(JoeyError) as info:
        client.build_pipeline("nope").deploy()
    assert info.value.code == "FAILED_PRECONDITION"
    assert info.value.message.startswith(
        f"pipeline 'nope' has no steps, and workspace {client.workspace!r} has no stored version of it"
    )
    assert "add_model_step(" in info.value.message and "joey pipeline create nope" in info.value.message
    # A stored pipeline deploys its latest version without steps in hand.
    client.build_pipeline("stored").add_model_step("iris").create()
    assert client.build_pipeline("stored").deploy(timeout=90).pipeline_version == 1
    client.build_pipeline("stored").undeploy()


def test_status_of_an_undeployed_pipeline_is_history_and_no_replica_is_alive(client: Client) -> None:
    pipeline = client.build_pipeline("p").add_model_step("iris")
    pipeline.create()
    never = pipeline.status()
    assert (never.deployed, never.message, never.undeployed_at) == (False, "never deployed", None)

    pipeline.deploy(replicas=2, timeout=90)
    pipeline.undeploy()
    status = pipeline.status()
    assert (status.status, status.deployed, status.ready) == ("Undeployed", False, False)
    assert status.message.startswith("not deployed; last deployed: version 1 with 2 replicas, undeployed ")
    assert status.undeployed_at is not None
    # Replicas are still finishing their batch (each leaves the group in turn): stopping, never alive.
    assert status.replicas and all(not r.alive and r.phase == "stopping" for r in status.replicas), status
    assert status.current_replicas() == ()
    wait_until(lambda: not pipeline.status().replicas, 60, "the replicas to leave")
    assert pipeline.status().message.startswith("not deployed; last deployed: version 1 with 2 replicas")
    with pytest.raises(JoeyError, match="FAILED_PRECONDITION"):
        pipeline.wait_ready(timeout=5)


def test_deploy_reports_each_step_of_the_replicas_start(client: Client) -> None:
    client.upload_model(
        "prep",
        STEPS / "iris_preprocess.py",
        framework="python",
        input_schema=pa.schema([(name, pa.float64()) for name in FIELDS]),
        output_schema=pa.schema([("features", pa.list_(pa.float32(), 4))]),
    )
    pipeline = client.build_pipeline("py").add_model_step("prep").add_model_step("iris")
    seen: list[DeploymentStatus] = []
    final = pipeline.deploy(replicas=2, timeout=90, on_status=seen.append)

    messages = [s.message for s in seen]
    assert final.ready and messages[-1] == "2/2 replicas ready; all 4 partitions assigned", messages
    assert len(set(messages)) == len(messages), "on_status is called on changes only"
    # The sandboxes take a process start, and the group join takes the broker's rebalance delay: both
    # last longer than the SDK's polling interval.
    assert any("loading (loading 1 model, starting 1 python step sandbox)" in m for m in messages), messages
    assert any("joining the consumer group" in m for m in messages), messages
    phases = {r.phase for s in seen for r in s.current_replicas()}
    assert {"loading", "joining", "running"} <= phases, phases
    assert [r.phase for r in final.replicas] == ["running", "running"]
    pipeline.undeploy()


def test_a_replica_loading_longer_than_a_heartbeat_lives_is_loading_not_dead(
    client: Client, tmp_path: Path
) -> None:
    # A step that takes longer to import than a heartbeat's TTL (3 s for the stack's engine), as a large
    # model can.
    slow = tmp_path / "slow_prep.py"
    source = (STEPS / "iris_preprocess.py").read_text()
    slow.write_text(
        source.replace("import numpy as np\n", "import time\n\nimport numpy as np\n\ntime.sleep(5)\n", 1)
    )
    client.upload_model(
        "slow-prep",
        slow,
        framework="python",
        input_schema=pa.schema([(name, pa.float64()) for name in FIELDS]),
        output_schema=pa.schema([("features", pa.list_(pa.float32(), 4))]),
    )
    pipeline = client.build_pipeline("slow").add_model_step("slow-prep").add_model_step("iris")
    seen: list[DeploymentStatus] = []
    final = pipeline.deploy(replicas=1, timeout=120, on_status=seen.append)
    assert final.ready
    phases = [r.phase for s in seen for r in s.replicas]
    assert "loading" in phases and "dead" not in phases, phases
    pipeline.undeploy()
