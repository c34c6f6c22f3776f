"""Validation checks through the SDK and the CLI: building, reading back, anomaly columns, filters."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from joey.client import Client, ModelStep, PipelineVersion, ValidationsStep
from joey.client.pipelines import replies_to_frame
from joey_cli import main
from joey_core.replies import Reply
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack

T0 = datetime(2025, 5, 1, 9, 0, tzinfo=UTC)
TOO_SURE = "out.probabilities[0] > 0.99"
BAD_LEN = "len(in.features) != 4"


def reply(request_id: str, ok: bool = True, **body: object) -> Reply:
    return Reply(request_id, ok, {"time": "2025-05-01T09:00:00+00:00", "metadata": {}, **body})


def test_frame_has_anomaly_columns_from_the_output_record() -> None:
    frame = replies_to_frame(
        [
            reply(
                "a",
                out={"label": [0]},
                check_failures=["too_sure"],
                anomaly={"count": 1, "too_sure": True, "bad_len": False},
            ),
            reply(
                "b",
                out={"label": [1]},
                check_failures=[],
                anomaly={"count": 0, "too_sure": False, "bad_len": False},
            ),
            reply("c", ok=False, input={"features": [1]}, error="bad input"),
        ]
    )
    assert [c for c in frame.columns if c.startswith("anomaly.")] == [
        "anomaly.count",
        "anomaly.too_sure",
        "anomaly.bad_len",
    ]
    assert frame["anomaly.count"].tolist()[:2] == [1, 0]
    assert frame["anomaly.too_sure"].tolist()[:2] == [True, False]
    assert pd.isna(frame["anomaly.count"].iloc[2])  # a failed record was not checked
    assert frame["check_failures"].tolist() == [["too_sure"], [], []]


def test_frame_without_validations_has_no_anomaly_columns() -> None:
    frame = replies_to_frame([reply("a", out={"label": [0]}, check_failures=[])])
    assert not [c for c in frame.columns if c.startswith("anomaly")]


def test_pipeline_version_steps_are_typed() -> None:
    message = pb.PipelineVersion(
        workspace="w",
        pipeline="p",
        version=3,
        steps=[
            pb.ResolvedStep(model="iris", version=2, sha256="ab" * 32),
            pb.ResolvedStep(checks={"too_sure": TOO_SURE, "bad_len": BAD_LEN}),
        ],
    )
    version = PipelineVersion.from_proto(message)
    assert version.steps == (
        ModelStep("iris", 2, "ab" * 32),
        ValidationsStep({"bad_len": BAD_LEN, "too_sure": TOO_SURE}),
    )
    assert [str(s) for s in version.steps] == ["iris:2", "validations(bad_len, too_sure)"]
    assert hash(version)  # frozen, and hashable even though checks are a dict


def test_add_validations_needs_a_check() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(ValueError, match="at least one check"):
        client.build_pipeline("p").add_model_step("iris").add_validations()


@pytest.mark.parametrize("check", ["too_sure", "=out.label > 1", "x="])
def test_cli_refuses_malformed_check(check: str) -> None:
    result = CliRunner().invoke(
        main, ["--registry", "127.0.0.1:1", "pipeline", "create", "p", "-m", "iris", "--check", check]
    )
    assert result.exit_code == 2, result.output
    assert "expected NAME=EXPRESSION" in result.output
    assert repr(check) in result.output


@pytest.fixture
def client(stack: Stack, settings: CommonSettings, iris_model: Path) -> Client:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    client.upload_model("iris", iris_model)
    return client


def test_sdk_creates_and_reads_back_validations(client: Client) -> None:
    pipeline = (
        client.build_pipeline("p").add_model_step("iris").add_validations(too_sure=TOO_SURE, bad_len=BAD_LEN)
    )
    created = pipeline.create()
    assert created.version == 1
    assert created.steps[1] == ValidationsStep({"bad_len": BAD_LEN, "too_sure": TOO_SURE})
    # Loaded back, the builder holds the same steps: creating again makes no new version.
    assert client.get_pipeline("p").create().version == 1
    assert pipeline.add_validations(odd='in.note == "odd"').create().version == 2
    assert [len(v.steps) for v in pipeline.versions()] == [2, 3]


def test_cli_creates_checks_after_the_model_steps(client: Client, settings: CommonSettings) -> None:
    runner = CliRunner()
    base = [
        "--registry",
        settings.registry_addr,
        "-w",
        client.workspace,
        "pipeline",
        "create",
        "p",
        "-m",
        "iris",
    ]
    result = runner.invoke(main, [*base, "--check", f"too_sure={TOO_SURE}", "-c", "same=out.label[0] == 1"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "p version 1: iris:1 -> validations(same, too_sure)"
    bad = runner.invoke(main, [*base, "--check", "too_sure=out.score > 1"])
    assert bad.exit_code == 1
    assert "check 'too_sure' reads out.score" in bad.output


def test_anomalies_only_logs_count_and_export(client: Client, database_url: str, tmp_path: Path) -> None:
    pipeline = client.build_pipeline("p").add_model_step("iris").add_validations(too_sure=TOO_SURE)
    pipeline.create()
    with psycopg.connect(database_url, autocommit=True) as db:
        for i in range(12):
            db.execute(
                "INSERT INTO inference_logs (workspace, pipeline, pipeline_version, deployment_id, "
                "request_id, time, input_topic, input_partition, input_offset, ok, check_failures) "
                "VALUES (%s, 'p', 1, 'd1', %s, %s, 'in', 0, %s, true, %s)",
                (
                    client.workspace,
                    f"r{i}",
                    T0 + timedelta(seconds=i),
                    i,
                    Jsonb(["too_sure"] if i % 3 == 0 else []),
                ),
            )
    frame = pipeline.logs(anomalies_only=True)
    assert frame["request_id"].tolist() == ["r9", "r6", "r3", "r0"]
    assert pipeline.log_count(anomalies_only=True) == 4
    assert pipeline.log_count() == 12
    files = pipeline.export_logs(tmp_path, format="jsonl", page_size=3, anomalies_only=True)
    assert [line.count('"too_sure"') for f in files for line in f.read_text().splitlines()] == [1] * 4

    result = CliRunner().invoke(
        main,
        ["--registry", client.settings.registry_addr, "-w", client.workspace, "logs", "p", "--anomalies"],
    )
    assert result.exit_code == 0, result.output
    assert re.findall(r"\br\d+\b", result.output) == ["r9", "r6", "r3", "r0"]
