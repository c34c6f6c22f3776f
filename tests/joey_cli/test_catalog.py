"""`joey model|pipeline|workspace` listings, descriptions and deletes: the real CLI in a subprocess
against the session's stack, checking exit codes and the first line of what it says."""

from __future__ import annotations

import os
import pty
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from joey.client import Client
from joey_core.settings import CommonSettings
from tests.conftest import Stack, wait_until
from tests.joey_cli.test_commands import joey


@pytest.fixture
def cli_env(stack: Stack) -> dict[str, str]:
    return os.environ | stack.env | {"JOEY_WORKSPACE": f"ws-{secrets.token_hex(4)}"}


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def refused(env: dict[str, str], *args: str) -> str:
    """The first line of the error of a command that must fail with exit code 1."""
    result = joey(env, *args, check=False)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    return first_line(result.stderr)


def test_lists_describe_and_deletes(
    cli_env: dict[str, str], settings: CommonSettings, iris_model: Path
) -> None:
    ws = cli_env["JOEY_WORKSPACE"]
    assert joey(cli_env, "workspace", "create", ws).stdout.strip() == f"created workspace {ws}"
    # What is not under test is set up through the SDK, in-process: each CLI run costs a second.
    client = Client(settings=settings, workspace=ws)
    client.upload_model("iris", iris_model)
    client.upload_model("iris", iris_model)
    client.build_pipeline("idle").add_model_step("iris").create()
    deployed = client.build_pipeline("p").add_model_step("iris", 1)
    deployed.deploy(replicas=1)

    # Not a terminal: bare names, for scripts.
    assert ws in joey(cli_env, "workspace", "list").stdout.splitlines()
    models = joey(cli_env, "model", "list").stdout.splitlines()
    assert models[0].split() == [
        "name",
        "versions",
        "latest",
        "framework",
        "inputs",
        "outputs",
        "tags",
        "uploaded",
    ]
    assert models[1].split()[:6] == ["iris", "2", "2", "onnx", "features", "float32[-1,4]"]
    assert "label int64[-1], probabilities float32[-1,3]" in models[1]
    versions = joey(cli_env, "model", "get", "iris").stdout.splitlines()
    assert versions[0].split()[:6] == ["name", "version", "framework", "status", "inputs", "outputs"]
    assert [line.split()[1] for line in versions[1:]] == ["1", "2"]
    pipelines = joey(cli_env, "pipeline", "list").stdout.splitlines()
    assert pipelines[0].split() == ["name", "latest", "deployed", "replicas", "status", "tags", "updated"]
    assert pipelines[1].split()[:5] == ["idle", "1", "no", "-", "Undeployed"]
    assert pipelines[2].split()[:5] == ["p", "1", "v1", "1", "Running"]
    assert pipelines[2].endswith(" UTC") and models[1].endswith(" UTC")

    described = joey(cli_env, "pipeline", "describe", "p").stdout.splitlines()
    assert described[0] == f"pipeline p (workspace {ws}), 1 version"
    assert described[2].startswith("deployment: Running, version 1, 1 replica")
    model = joey(cli_env, "model", "describe", "iris", "--version", "1").stdout.splitlines()
    assert model[0] == f"model iris (workspace {ws}), 2 versions"
    assert model[1].startswith("  version 1: onnx, ")
    assert model[2:] == [
        "    inputs:  features float32[-1,4]",
        "    outputs: label int64[-1], probabilities float32[-1,3]",
        "    used by: p v1 (deployed)",
    ]
    assert refused(cli_env, "model", "describe", "iris", "--version", "9").startswith(
        f"Error: model 'iris' has no version 9 in workspace '{ws}' (latest is 2)"
    )

    # Refusals say why and what to do, and change nothing.
    usage = joey(cli_env, "model", "delete", "iris", "--version", "0", check=False)
    assert usage.returncode == 2, (usage.stdout, usage.stderr)
    assert usage.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '--version': 0 is not in the range x>=1."
    )
    assert refused(cli_env, "model", "delete", "iris", "--version", "1").startswith(
        "Error: version 1 of model 'iris' is in use by deployed pipeline 'p' (version 1 uses iris v1); "
        "undeploy it first (`joey pipeline undeploy p`)"
    )
    assert refused(cli_env, "pipeline", "delete", "p", "--yes").startswith(
        "Error: pipeline 'p' is deployed (version 1, 1 replica,"
    )
    assert refused(cli_env, "workspace", "delete", ws, "-y").startswith(
        f"Error: workspace '{ws}' is not empty: it holds pipelines 'idle', 'p'; models 'iris'; delete them "
        f"first, in that order (`joey -w {ws} pipeline delete idle`, `joey -w {ws} model delete iris`)"
    )
    assert refused(cli_env, "workspace", "delete", "default", "-y").startswith(
        "Error: the 'default' workspace cannot be deleted"
    )
    assert [m.version for m in client.model_versions("iris")] == [1, 2]
    assert len(client.list_pipelines()) == 2

    assert joey(cli_env, "model", "delete", "iris", "--version", "2").stdout.strip() == (
        "deleted model iris version 2"
    )
    deployed.undeploy()
    wait_until(
        lambda: not any(r.alive for r in deployed.status().replicas), 60, "the replicas to stop", interval=0.5
    )
    assert joey(cli_env, "pipeline", "delete", "p", "--yes").stdout.strip() == (
        "deleted pipeline p: 1 version, 0 logged inferences"
    )
    client.delete_pipeline("idle")
    assert joey(cli_env, "model", "delete", "iris", "--yes").stdout.strip() == (
        "deleted model iris version 1, and the model"
    )
    assert first_line(joey(cli_env, "model", "list").stdout) == f"no models in workspace {ws}"
    assert joey(cli_env, "workspace", "delete", ws, "--yes").stdout.strip() == f"deleted workspace {ws}"
    assert ws not in client.list_workspaces()
    client.close()


def without_terminal(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "joey_cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def in_terminal(env: dict[str, str], answer: str, *args: str) -> tuple[int, str]:
    """Run with a terminal as stdin and stdout, answering ``answer`` to a prompt; exit code and output."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "joey_cli", *args], env=env, stdin=follower, stdout=follower, stderr=follower
    )
    os.close(follower)
    output = b""
    answered = False
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if not answered and b"[y/N]" in output:
            os.write(leader, answer.encode() + b"\n")
            answered = True
    os.close(leader)
    return process.wait(timeout=60), output.decode().replace("\r\n", "\n")


def test_deletes_ask_first_and_refuse_without_a_terminal(
    cli_env: dict[str, str], settings: CommonSettings, iris_model: Path
) -> None:
    ws = cli_env["JOEY_WORKSPACE"]
    client = Client(settings=settings, workspace=ws)
    client.create_workspace(ws)
    client.upload_model("iris", iris_model)
    client.build_pipeline("p").add_model_step("iris").create()
    client.build_pipeline("p").add_model_step("iris").add_validations(high="out.label > 1").create()

    for args, what in (
        (("pipeline", "delete", "p"), "pipeline p"),
        (("model", "delete", "iris"), "model iris"),
        (("workspace", "delete", ws), f"workspace {ws}"),
    ):
        result = without_terminal(cli_env, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert first_line(result.stderr) == (
            f"Error: not deleting {what}: there is no terminal to confirm in; pass --yes (-y) to delete it"
        )

    code, output = in_terminal(cli_env, "n", "pipeline", "delete", "p")
    assert code == 1, output
    assert first_line(output) == "delete pipeline p: 2 versions, 0 logged inferences? [y/N]: n"
    assert "Aborted!" in output
    assert len(client.get_pipeline("p").versions()) == 2
    # One version: no question.
    code, output = in_terminal(cli_env, "y", "model", "delete", "iris", "--version", "1")
    assert (code, output.strip()) == (0, "deleted model iris version 1"), output
    code, output = in_terminal(cli_env, "y", "pipeline", "delete", "p")
    assert code == 0, output
    assert output.splitlines()[-1] == "deleted pipeline p: 2 versions, 0 logged inferences"
    client.close()


def test_artifacts_tags_and_filtered_lists(
    cli_env: dict[str, str], settings: CommonSettings, iris_model: Path, tmp_path: Path
) -> None:
    ws = cli_env["JOEY_WORKSPACE"]
    client = Client(settings=settings, workspace=ws)
    client.create_workspace(ws)
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "train.ipynb").write_text("{}")
    (tmp_path / "run" / "data" / "sample.csv").write_text("a,b\n1,2\n")

    uploaded = joey(
        cli_env, "model", "upload", "iris", str(iris_model), "--artifact", str(tmp_path / "run"),
        "--source", "git:4f2a9c1", "--metadata", '{"auc": 0.91}',
    ).stdout.splitlines()  # fmt: skip
    assert uploaded[1] == "  artifacts: 2 files, 10 bytes"
    assert client.get_model("iris").metadata == {"auc": 0.91}
    client.upload_model("other", iris_model)
    client.build_pipeline("p").add_model_step("iris").create()

    listed = joey(cli_env, "model", "artifacts", "iris").stdout.splitlines()
    assert [line.split()[:2] for line in listed] == [
        ["name", "size_bytes"],
        ["data/sample.csv", "8"],
        ["train.ipynb", "2"],
    ]
    out = tmp_path / "out"
    assert joey(cli_env, "model", "artifacts", "iris", "--download", str(out)).stdout.strip() == (
        f"downloaded 2 artifacts of iris version 1 to {out}"
    )
    assert (out / "data" / "sample.csv").read_text() == "a,b\n1,2\n"

    assert joey(cli_env, "model", "tag", "iris", "fraud").stdout.strip() == "fraud"
    assert joey(cli_env, "pipeline", "tag", "p", "fraud").stdout.strip() == "fraud"
    models = joey(cli_env, "model", "list", "--tag", "fraud", "--framework", "onnx").stdout.splitlines()
    assert [line.split()[0] for line in models[1:]] == ["iris"]
    assert joey(cli_env, "pipeline", "list", "--tag", "fraud").stdout.splitlines()[1].split()[0] == "p"
    assert refused(cli_env, "model", "tag", "iris", "Fraud").startswith(
        "Error: tag 'Fraud' refused (tags are lowercase: 'fraud')"
    )
    assert joey(cli_env, "model", "tag", "iris", "fraud", "--remove").stdout.strip() == "(no tags)"
    client.close()
