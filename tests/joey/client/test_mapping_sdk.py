"""Input mappings through the SDK and the CLI: building, reading back, `--map` parsing."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from click.testing import CliRunner

from joey.client import Client, ModelStep, PipelineVersion
from joey_cli import main
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack
from tests.registry.helpers import identity_model


def test_model_steps_show_their_mapping() -> None:
    message = pb.PipelineVersion(
        workspace="w",
        pipeline="p",
        version=1,
        steps=[
            pb.ResolvedStep(model="a", version=2, sha256="ab" * 32, input_mapping={"z": "q", "f": "petals"}),
            pb.ResolvedStep(model="b", version=1, sha256="cd" * 32),
        ],
    )
    version = PipelineVersion.from_proto(message)
    assert version.steps == (
        ModelStep("a", 2, "ab" * 32, {"f": "petals", "z": "q"}),
        ModelStep("b", 1, "cd" * 32),
    )
    assert [str(s) for s in version.steps] == ["a:2(f<-petals, z<-q)", "b:1"]
    assert hash(version)


def create_args(*args: str, registry: str = "127.0.0.1:1", workspace: str = "default") -> list[str]:
    return ["--registry", registry, "-w", workspace, "pipeline", "create", "p", *args]


@pytest.mark.parametrize(
    "value", ["x=probabilities", "2x=probabilities", "0:x=probabilities", "two:x=y", "2:x", "2:=y", "2:x="]
)
def test_cli_refuses_malformed_map(value: str) -> None:
    result = CliRunner().invoke(main, create_args("-m", "a", "-m", "b", "--map", value))
    assert result.exit_code == 2, result.output
    assert "expected STEP:INPUT=SOURCE" in result.output
    assert repr(value) in result.output


def test_cli_refuses_a_map_twice_or_beyond_the_steps() -> None:
    runner = CliRunner()
    twice = runner.invoke(main, create_args("-m", "a", "-m", "b", "--map", "2:x=y", "--map", "2: x = z"))
    assert twice.exit_code == 2, twice.output
    assert "input 'x' of model step 2 is mapped twice" in twice.output
    beyond = runner.invoke(main, create_args("-m", "a", "-m", "b", "--map", "3:x=y"))
    assert beyond.exit_code == 2, beyond.output
    assert "there is no model step 3: 2 --model given" in beyond.output


@pytest.fixture
def client(stack: Stack, settings: CommonSettings, iris_model: Path, tmp_path: Path) -> Client:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    client.upload_model("iris", iris_model)
    model_b = tmp_path / "b.onnx"
    model_b.write_bytes(identity_model("x", "float32", "y", width=3))
    client.upload_model("b", model_b)
    return client


def test_sdk_mapping_round_trips(client: Client) -> None:
    pipeline = (
        client.build_pipeline("p")
        .add_model_step("iris", inputs={"features": "petals"})
        .add_model_step(client.get_model("b"), inputs={"x": "probabilities"})
    )
    created = pipeline.create()
    assert created.version == 1
    assert [str(s) for s in created.steps] == ["iris:1(features<-petals)", "b:1(x<-probabilities)"]
    # Loaded back, the builder holds the same steps and mappings: no new version.
    loaded = client.get_pipeline("p")
    assert loaded.create().version == 1
    assert loaded.versions()[-1].steps == created.steps

    changed = client.build_pipeline("p").add_model_step("iris", inputs={"features": "sepals"})
    assert changed.add_model_step("b", inputs={"x": "probabilities"}).create().version == 2


def test_cli_maps_inputs(client: Client, settings: CommonSettings) -> None:
    runner = CliRunner()
    base = create_args("-m", "iris", "-m", "b", registry=settings.registry_addr, workspace=client.workspace)
    result = runner.invoke(main, [*base, "--map", "1:features=petals", "--map", "2:x=probabilities"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "p version 1: iris:1(features<-petals) -> b:1(x<-probabilities)"
    bad = runner.invoke(main, [*base, "--map", "2:y=probabilities"])
    assert bad.exit_code == 1, bad.output
    assert "step 2 (b v1): model 'b' has no input 'y'" in bad.output
