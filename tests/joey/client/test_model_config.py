"""Per-model-version runtime config (Wallaroo's model.configure) through the SDK, the CLI, the registry
and the engine of the session's stack."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from joey.client import Client, JoeyError
from joey_cli import main
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack

# The batch each record ran in, as the model saw it: one record per call shows as 1.
BATCH_SEEN = """
import numpy as np

def process_data(inputs):
    n = len(inputs["x"])
    return {"seen": np.full(n, n, dtype=np.int64)}
"""


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Iterator[Client]:
    client = Client(settings=settings, workspace=f"config-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    yield client
    client.close()


def step_configs(client: Client, pipeline: str) -> list[pb.ModelConfig]:
    """Each pipeline version's first step config, oldest first, as the registry stored it."""
    found = client.call("GetPipeline", pb.GetPipelineRequest(workspace=client.workspace, name=pipeline))
    return [v.steps[0].config for v in found.versions]


def test_a_configured_model_batches_as_told_in_the_next_pipeline_version(
    client: Client, tmp_path: Path
) -> None:
    step = tmp_path / "seen.py"
    step.write_text(BATCH_SEEN)
    schema_in, schema_out = pa.schema([("x", pa.float32())]), pa.schema([("seen", pa.int64())])
    client.upload_model("seen", step, framework="python", input_schema=schema_in, output_schema=schema_out)
    capped = client.configure_model("seen", batch_size_target=3, max_batch_delay_ms=50)
    assert (capped.config.batch_size_target, capped.config.max_batch_delay_ms) == (3, 50)
    assert "config:  max_batch_delay_ms=50, batch_size_target=3" in client.describe_model("seen").text()

    pipeline = client.build_pipeline("seen").add_model_step("seen")
    pipeline.deploy(timeout=90)
    rows = [{"x": float(i)} for i in range(60)]
    seen = pipeline.infer(rows, timeout=60)["out.seen"].tolist()
    assert len(seen) == 60 and max(seen) <= 3, seen

    result = CliRunner().invoke(
        main,
        ["--registry", client.settings.registry_addr, "-w", client.workspace, "model", "configure", "seen"]
        + ["--batch-config", "single"],
    )
    assert result.exit_code == 0, result.output
    assert "model seen version 1: batch_config=single" in result.output
    pipeline.deploy(timeout=90)  # the current steps again: a new version, with the new config
    assert pipeline.infer(rows, timeout=60)["out.seen"].tolist() == [1] * 60
    first, second = step_configs(client, "seen")
    assert (first.batch_size_target, first.batch_config) == (3, "")
    assert (second.HasField("batch_size_target"), second.batch_config) == (False, "single")
    pipeline.undeploy()


def test_a_bad_config_is_refused_naming_the_field_and_changes_nothing(
    client: Client, iris_model: Path
) -> None:
    client.upload_model("iris", iris_model)
    client.configure_model("iris", max_batch_delay_ms=7)
    with pytest.raises(ValueError, match="batch_config is 'many'"):
        client.configure_model("iris", batch_config="many")
    bad = {"batch_config": "many"}, {"batch_size_target": 0}, {"max_batch_delay_ms": 10**6}
    for fields in bad:
        request = pb.ConfigureModelRequest(
            workspace=client.workspace,
            name="iris",
            config=pb.ModelConfig(**fields),  # type: ignore[arg-type]
        )
        with pytest.raises(JoeyError) as raised:
            client.call("ConfigureModel", request)
        assert raised.value.code == "INVALID_ARGUMENT" and next(iter(fields)) in raised.value.message
    with pytest.raises(JoeyError, match="no version 5"):
        client.configure_model("iris", version=5, batch_config="single")
    assert client.get_model("iris").config.max_batch_delay_ms == 7
