"""Every command that needs the registry, run while none answers: one `Error:` line naming the address and
what to do, exit code 1, never a traceback (the group turns SDK and gRPC errors into that line)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from joey_cli.commands import main
from joey_core.credentials import Credential, CredentialsFile
from tests.conftest import free_port

# Commands that run without the registry: the stack's own and the shell's.
LOCAL = {"serve", "up", "down", "status", "completion"}

ASSAY = ["-p", "iris", "--iopath", "input features 0", "--baseline-start", "2025-01-01T00:00:00Z"]
ASSAY += ["--baseline-end", "2025-01-02T00:00:00Z", "--width", "60"]


# Arguments for each command, valid enough to reach the registry; RECORDS and DIR are made per test.
INVOCATIONS = {
    "workspace create": ["w"],
    "workspace list": [],
    "workspace delete": ["w", "--yes"],
    "model upload": ["m", __file__, "--framework", "python"],
    "model list": [],
    "model get": ["m"],
    "model describe": ["m"],
    "model delete": ["m", "--yes"],
    "pipeline create": ["p", "--model", "m"],
    "pipeline list": [],
    "pipeline describe": ["p"],
    "pipeline delete": ["p", "--yes"],
    "pipeline deploy": ["p"],
    "pipeline rollback": ["p"],
    "pipeline status": ["p"],
    "pipeline undeploy": ["p"],
    "infer": ["p", "--file", "RECORDS"],
    "logs": ["p"],
    "export-logs": ["p", "--dir", "DIR"],
    "assay create": ["a", *ASSAY],
    "assay preview": ["a", *ASSAY],
    "assay run": ["a", *ASSAY],
    "assay list": [],
    "assay get": ["a"],
    "assay pause": ["a"],
    "assay resume": ["a"],
    "assay delete": ["a"],
    "assay results": ["a"],
    "orchestration upload": ["o", __file__],
    "orchestration list": [],
    "orchestration status": ["o"],
    "orchestration delete": ["o"],
    "task run-once": ["t", "-o", "o"],
    "task schedule": ["t", "-o", "o", "--schedule", "0 2 * * *"],
    "task continuous": ["t", "-o", "o"],
    "task list": [],
    "task status": ["t"],
    "task kill": ["t"],
    "task delete": ["t"],
    "task runs": ["t"],
    "task logs": ["t"],
    "login": ["--username", "u", "--password-stdin"],
    "logout": [],
    "whoami": [],
    "user create": ["u", "--password-stdin"],
    "user list": [],
    "user deactivate": ["u"],
    "user activate": ["u"],
    "token create": ["t"],
    "token list": [],
    "token revoke": ["t"],
    "workspace add-user": ["w", "u"],
    "workspace remove-user": ["w", "u"],
    "workspace users": ["w"],
    "audit": [],
    "model configure": ["m", "--batch-config", "single"],
    "model artifacts": ["m"],
    "model tag": ["m", "fraud"],
    "pipeline tag": ["p", "fraud"],
    "connection create": ["c", "--type", "files", "-d", "path=/tmp"],
    "connection list": [],
    "connection get": ["c"],
    "connection test": ["c"],
    "connection delete": ["c", "--yes"],
    "workspace add-connection": ["w", "c"],
    "workspace remove-connection": ["w", "c"],
    "workspace connections": ["w"],
    "source create": ["s", "--connection", "c", "--pipeline", "p"],
    "sink create": ["s", "--pipeline", "p", "--connection", "c"],
    "source list": [],
    "source status": ["s"],
    "source pause": ["s"],
    "source resume": ["s"],
    "source delete": ["s"],
    "sink list": [],
    "sink status": ["s"],
    "sink pause": ["s"],
    "sink resume": ["s"],
    "sink delete": ["s"],
}
PASSWORD = "a-password-on-stdin\n"
"""What --password-stdin reads."""


def leaf_commands(group: click.Group, prefix: str = "") -> list[str]:
    names = []
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        names += leaf_commands(command, f"{path} ") if isinstance(command, click.Group) else [path]
    return names


def test_the_table_covers_every_command() -> None:
    missing = sorted(set(leaf_commands(main)) - LOCAL - set(INVOCATIONS))
    assert not missing, f"add to INVOCATIONS, with arguments that reach the registry: {missing}"


@pytest.mark.parametrize("command", sorted(INVOCATIONS))
def test_an_unreachable_registry_is_one_error_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"features": [1.0, 2.0, 3.0, 4.0]}]))
    made = {"RECORDS": str(records), "DIR": str(tmp_path / "export")}
    addr = f"127.0.0.1:{free_port()}"  # nothing listens there
    # `joey logout` calls the registry with the token stored for it.
    credentials = tmp_path / "credentials"
    CredentialsFile(credentials).put(addr, Credential("u", "joey_stored"))
    monkeypatch.setenv("JOEY_CREDENTIALS", str(credentials))
    args = ["--registry", addr, *command.split(), *(made.get(a, a) for a in INVOCATIONS[command])]
    result = CliRunner().invoke(main, args, input=PASSWORD)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert lines == [
        f"Error: cannot reach the registry at {addr}: is Joey running? Start it with `joey up`, "
        "or point --registry / JOEY_REGISTRY_ADDR at a running registry"
    ], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["pipeline", "rollback", "p", "--version", "0"], "'--version': 0 is not in the range x>=1"),
        (["pipeline", "rollback", "p", "--timeout", "0"], "'--timeout': 0.0 is not in the range x>0"),
        (["model", "get", "m", "--version", "0"], "'--version': 0 is not in the range x>=1"),
        (["logs", "p", "--start", "notatime"], "'notatime' is not an ISO time"),
        (["export-logs", "p", "--dir", "x", "--end", "soon"], "'soon' is not an ISO time"),
        (["infer", "p", "--file", "BAD"], "is neither JSON nor JSON lines: line 2"),
        (["token", "create", "t", "--expires-in", "0"], "'0' is not a duration"),
        (["audit", "--since", "yesterday"], "'yesterday' is neither an ISO time"),
    ],
)
def test_a_bad_argument_is_a_usage_error_naming_it(args: list[str], named: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{not json\n')
    args = [str(bad) if a == "BAD" else a for a in args]
    result = CliRunner().invoke(main, ["--registry", f"127.0.0.1:{free_port()}", *args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a usage error, not a crash
    assert named in result.output, result.output
