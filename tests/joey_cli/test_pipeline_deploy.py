"""`joey pipeline deploy | status | undeploy` as a user types them: the real CLI in a subprocess against
the session's stack, checking exit codes and the first line each prints."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from joey.client import Client
from joey_core.settings import CommonSettings
from tests.conftest import Stack, wait_until


@pytest.fixture
def cli(stack: Stack, settings: CommonSettings, iris_model: Path) -> tuple[dict[str, str], Client]:
    """The CLI's environment, pointed at a fresh workspace holding the iris model."""
    client = Client(settings=settings, workspace=f"cli-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    client.upload_model("iris", iris_model)
    return os.environ | stack.env | {"JOEY_WORKSPACE": client.workspace}, client


def joey(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "joey_cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def test_deploy_shows_progress_then_status_and_undeploy_leaves_history(
    cli: tuple[dict[str, str], Client],
) -> None:
    env, client = cli
    assert joey(env, "pipeline", "create", "p", "--model", "iris").returncode == 0

    deployed = joey(env, "pipeline", "deploy", "p", "--replicas", "2")
    assert deployed.returncode == 0, deployed.stderr
    progress = deployed.stderr.splitlines()
    assert progress and all(" s  " in line for line in progress), deployed.stderr
    assert any("joining the consumer group" in line for line in progress), deployed.stderr
    assert first_line(deployed.stdout).startswith("p ready in ")
    assert deployed.stdout.splitlines()[1] == (
        "Running (version 1, 2 replicas): 2/2 replicas ready; all 4 partitions assigned"
    )
    assert deployed.stdout.count(": running, version 1, partitions=") == 2

    status = joey(env, "pipeline", "status", "p")
    assert status.returncode == 0
    assert first_line(status.stdout).startswith("Running (version 1, 2 replicas): 2/2 replicas ready")

    undeployed = joey(env, "pipeline", "undeploy", "p")
    assert undeployed.returncode == 0
    assert first_line(undeployed.stdout).startswith("p undeployed")
    after = joey(env, "pipeline", "status", "p")
    assert after.returncode == 0
    assert first_line(after.stdout).startswith("p: not deployed; last deployed: version 1 with 2 replicas")
    assert "alive" not in after.stdout and "running" not in after.stdout, after.stdout
    wait_until(lambda: not client.build_pipeline("p").status().replicas, 60, "the replicas to leave")

    again = joey(env, "pipeline", "undeploy", "p")
    assert again.returncode == 1
    assert (
        first_line(again.stderr)
        == f"Error: pipeline 'p' in workspace {client.workspace!r} is not deployed (FAILED_PRECONDITION)"
    )


def test_status_of_a_pipeline_never_deployed(cli: tuple[dict[str, str], Client]) -> None:
    env, _ = cli
    assert joey(env, "pipeline", "create", "p", "--model", "iris").returncode == 0
    status = joey(env, "pipeline", "status", "p")
    assert (status.returncode, first_line(status.stdout)) == (0, "p: not deployed (never deployed)")


def test_bad_deploy_arguments_are_refused(cli: tuple[dict[str, str], Client]) -> None:
    env, client = cli
    zero = joey(env, "pipeline", "deploy", "p", "--replicas", "0")
    assert zero.returncode == 2
    assert "Invalid value for '--replicas': 0 is not in the range x>=1." in zero.stderr
    inverted = joey(env, "pipeline", "deploy", "p", "--autoscale", "3-2")
    assert inverted.returncode == 2
    assert "autoscaling needs 1 <= min_replicas <= max_replicas, got min 3 and max 2" in inverted.stderr
    too_many = joey(env, "pipeline", "deploy", "nope", "--replicas", "9")
    assert too_many.returncode == 1
    assert first_line(too_many.stderr).startswith("Error: pipeline 'nope' has no steps")
    assert joey(env, "pipeline", "create", "p", "--model", "iris").returncode == 0
    beyond = joey(env, "pipeline", "deploy", "p", "--replicas", "9")
    assert beyond.returncode == 1
    assert first_line(beyond.stderr) == (
        "Error: replicas must be between 1 and 4 (the partitions of each pipeline topic, "
        "JOEY_PIPELINE_PARTITIONS), got 9; to stop serving, undeploy the pipeline (INVALID_ARGUMENT)"
    )
    assert not client.build_pipeline("p").status().deployed


def test_every_option_of_deploy_status_and_undeploy_has_help(cli: tuple[dict[str, str], Client]) -> None:
    env, _ = cli
    for command in ("deploy", "status", "undeploy"):
        shown = joey(env, "pipeline", command, "--help")
        assert shown.returncode == 0
        options = [line for line in shown.stdout.splitlines() if line.startswith("  -")]
        assert options, shown.stdout
        # Click puts an option's help on its line, or on the next when the option is long.
        lines = shown.stdout.splitlines()
        for line in options:
            following = lines[lines.index(line) + 1] if lines.index(line) + 1 < len(lines) else ""
            assert len(line.split("  ")) > 2 or following.startswith(" " * 10), f"{command}: {line!r}"
    assert "Stop serving NAME" in joey(env, "pipeline", "undeploy", "--help").stdout
    assert "Show whether NAME is deployed" in joey(env, "pipeline", "status", "--help").stdout
