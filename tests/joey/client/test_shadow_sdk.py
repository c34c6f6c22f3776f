"""Shadow steps through the SDK and the CLI: building, reading back, shadow columns, `--challenger`."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from joey.client import Client, ModelStep, PipelineVersion, ShadowStep
from joey.client.pipelines import log_entries_to_frame, replies_to_frame
from joey_cli import main
from joey_core.replies import Reply
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack


def reply(request_id: str, ok: bool = True, **body: object) -> Reply:
    return Reply(request_id, ok, {"time": "2025-05-01T09:00:00+00:00", "metadata": {}, **body})


def test_frame_has_shadow_columns_from_the_output_record() -> None:
    frame = replies_to_frame(
        [
            reply(
                "a",
                out={"label": [0]},
                shadow={"iris-b": {"label": [1], "probabilities": [0.1, 0.8, 0.1]}, "iris-c": {"label": [0]}},
            ),
            reply(
                "b",
                out={"label": [2]},
                shadow={"iris-b": {"label": [2], "probabilities": [0.0, 0.1, 0.9]}},
                shadow_errors={"iris-c": "output 'label' has 0 rows for 1 records"},
            ),
            reply("c", ok=False, input={"features": [1]}, error="bad input"),
        ]
    )
    shadow = [c for c in frame.columns if c.startswith("shadow")]
    assert shadow == [
        "shadow.iris-b.label",
        "shadow.iris-b.probabilities",
        "shadow.iris-c.label",
        "shadow_errors.iris-c",
    ]
    assert frame["out.label"].tolist()[:2] == [[0], [2]]
    assert frame["shadow.iris-b.label"].tolist()[:2] == [[1], [2]]
    assert frame["shadow.iris-c.label"].iloc[0] == [0]
    assert pd.isna(frame["shadow.iris-c.label"].iloc[1])
    assert pd.isna(frame["shadow_errors.iris-c"].iloc[0])
    assert frame["shadow_errors.iris-c"].iloc[1] == "output 'label' has 0 rows for 1 records"
    assert frame[shadow].iloc[2].isna().all()  # a failed record ran no model


def test_frame_without_shadow_has_no_shadow_columns() -> None:
    frame = replies_to_frame([reply("a", out={"label": [0]})])
    assert not [c for c in frame.columns if c.startswith("shadow")]


def log_entry(request_id: str, shadow_json: str) -> pb.LogEntry:
    time = pb.LogEntry().time
    time.FromDatetime(datetime(2025, 5, 1, 9, 0, tzinfo=UTC))
    return pb.LogEntry(
        request_id=request_id, time=time, ok=True, outputs_json='{"label": [0]}', shadow_json=shadow_json
    )


def test_log_frame_has_shadow_columns_from_shadow_json() -> None:
    shadow = {"iris-b": {"label": [1], "probabilities": [0.1, 0.8, 0.1]}}
    frame = log_entries_to_frame([log_entry("a", json.dumps(shadow)), log_entry("b", "")])
    assert [c for c in frame.columns if c.startswith("shadow")] == [
        "shadow.iris-b.label",
        "shadow.iris-b.probabilities",
    ]
    assert frame["shadow.iris-b.label"].iloc[0] == [1]
    assert frame["shadow.iris-b.probabilities"].iloc[0] == pytest.approx([0.1, 0.8, 0.1])
    assert pd.isna(frame["shadow.iris-b.label"].iloc[1])
    without = log_entries_to_frame([log_entry("b", "")])
    assert not [c for c in without.columns if c.startswith("shadow")]


def test_shadow_steps_are_typed() -> None:
    message = pb.PipelineVersion(
        workspace="w",
        pipeline="p",
        version=1,
        steps=[
            pb.ResolvedStep(
                model="iris",
                version=1,
                sha256="ab" * 32,
                challengers=[
                    pb.ResolvedStep(model="iris-b", version=2, sha256="cd" * 32),
                    pb.ResolvedStep(
                        model="iris-c", version=1, sha256="ef" * 32, input_mapping={"features": "petals"}
                    ),
                ],
            ),
            pb.ResolvedStep(model="probs", version=1, sha256="12" * 32),
        ],
    )
    version = PipelineVersion.from_proto(message)
    assert version.steps == (
        ShadowStep(
            ModelStep("iris", 1, "ab" * 32),
            (ModelStep("iris-b", 2, "cd" * 32), ModelStep("iris-c", 1, "ef" * 32, {"features": "petals"})),
        ),
        ModelStep("probs", 1, "12" * 32),
    )
    assert [str(s) for s in version.steps] == [
        "shadow(iris:1 vs iris-b:2, iris-c:1(features<-petals))",
        "probs:1",
    ]
    assert hash(version)


def test_sdk_refuses_a_shadow_step_without_challengers_or_with_a_bad_version() -> None:
    pipeline = Client(registry_addr="127.0.0.1:1").build_pipeline("p")
    with pytest.raises(ValueError, match="at least one challenger"):
        pipeline.add_shadow_deploy("iris", [])
    with pytest.raises(ValueError, match="expected 'name' or 'name:version'"):
        pipeline.add_shadow_deploy("iris", ["iris-b:latest"])


def create_args(*args: str, registry: str = "127.0.0.1:1", workspace: str = "default") -> list[str]:
    return ["--registry", registry, "-w", workspace, "pipeline", "create", "p", *args]


@pytest.mark.parametrize("value", ["b:", "b:x", "b:0", ":2", "b:-1"])
def test_cli_refuses_malformed_challenger(value: str) -> None:
    result = CliRunner().invoke(main, create_args("-m", "a", "--challenger", value))
    assert result.exit_code == 2, result.output
    assert "expected MODEL or MODEL:VERSION" in result.output
    assert repr(value) in result.output


@pytest.fixture
def client(stack: Stack, settings: CommonSettings, iris_model: Path) -> Client:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    for name in ("iris", "iris-b", "iris-b", "iris-c"):
        client.upload_model(name, iris_model)
    return client


def test_sdk_shadow_round_trips(client: Client) -> None:
    pipeline = client.build_pipeline("p").add_shadow_deploy(
        "iris", [client.get_model("iris-b", 1), "iris-c"], inputs={"iris-c": {"features": "petals"}}
    )
    created = pipeline.create()
    assert created.version == 1
    assert [str(s) for s in created.steps] == ["shadow(iris:1 vs iris-b:1, iris-c:1(features<-petals))"]
    # Loaded back, the builder holds the same steps: no new version.
    loaded = client.get_pipeline("p")
    assert loaded.create().version == 1
    assert loaded.versions()[-1].steps == created.steps

    latest = client.build_pipeline("p").add_shadow_deploy("iris", ["iris-b", "iris-c:1"])
    assert [str(s) for s in latest.create().steps] == ["shadow(iris:1 vs iris-b:2, iris-c:1)"]


def test_cli_makes_the_last_model_the_champion(client: Client, settings: CommonSettings) -> None:
    runner = CliRunner()
    base = create_args(registry=settings.registry_addr, workspace=client.workspace)
    result = runner.invoke(
        main,
        [*base, "-m", "iris", "-m", "iris-b:1", "--challenger", "iris-c", "--challenger", "iris:1"],
    )
    # The first model's outputs cannot feed a second iris: the registry names the champion.
    assert result.exit_code == 1, result.output
    assert "step 2 (champion iris-b v1) needs input 'features' (float32)" in result.output

    result = runner.invoke(
        main,
        [
            *base,
            "-m",
            "iris-b:1",
            "--challenger",
            "iris-c",
            "--challenger",
            "iris:1",
            "--map",
            "1:features=f",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "p version 1: shadow(iris-b:1(features<-f) vs iris-c:1, iris:1)"
    twice = runner.invoke(main, [*base, "-m", "iris", "--challenger", "iris"])
    assert twice.exit_code == 1, twice.output
    assert "challenger 'iris' is the champion's model" in twice.output
