"""A stack started by the real `joey up --detach` (embedded broker included), shared by the CLI's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SHORT_GROUP_SESSION, free_port


def joey(
    env: dict[str, str], *args: str, check: bool = True, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "joey_cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"joey {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `Error:` line of a failed command (progress bars may print before it)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@dataclass
class CliStack:
    env: dict[str, str]
    state_dir: Path
    """Where the stack lives: the default per-user location under this test's XDG_STATE_HOME."""
    first_up: subprocess.CompletedProcess[str] | None = None

    def state(self) -> dict[str, object]:
        return dict(json.loads((self.state_dir / "stack.json").read_text()))

    def ensure_up(self) -> None:
        """Start the stack unless it runs (a test that stops it leaves the next one a fresh start)."""
        if joey(self.env, "status", check=False).returncode != 0:
            up = joey(self.env, "up", "--detach")
            self.first_up = self.first_up or up


@pytest.fixture(scope="package")
def stack_env(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A second, separate stack: its own embedded broker, ports and state; the session's database.

    No JOEY_STATE_DIR: the stack's state goes to the per-user default, here under XDG_STATE_HOME. Its
    services consume with SHORT_GROUP_SESSION, as the session's do: every `joey up`, deploy and rollout
    waits 1 s per group round instead of 2."""
    home = tmp_path_factory.mktemp("cli-home")
    base = {k: v for k, v in os.environ.items() if k != "JOEY_STATE_DIR"}
    return (
        base
        | env
        | {
            "XDG_STATE_HOME": str(home / "state"),
            "JOEY_EMBEDDED_BROKER": "true",
            "JOEY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_REDIS_PREFIX": env["JOEY_REDIS_PREFIX"] + "cli",
            "JOEY_OIP_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_OIP_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_KAFKA_CONFIG": json.dumps(SHORT_GROUP_SESSION),
        }
    )


@pytest.fixture(scope="package")
def cli_stack_once(stack_env: dict[str, str]) -> Iterator[CliStack]:
    stack = CliStack(stack_env, Path(stack_env["XDG_STATE_HOME"]) / "joey")
    # What a supervisor killed without stopping leaves: a state naming a pid that has exited.
    stack.state_dir.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    (stack.state_dir / "stack.json").write_text(json.dumps({"pid": gone.pid, "status": "ready"}))
    stack.ensure_up()
    yield stack
    joey(stack_env, "down", check=False)


@pytest.fixture()
def cli_stack(cli_stack_once: CliStack) -> CliStack:
    cli_stack_once.ensure_up()
    return cli_stack_once
