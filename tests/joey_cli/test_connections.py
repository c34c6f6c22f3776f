"""`joey connection ...` and `joey workspace add-connection|connections` as a user runs them, against the
session's registry, which allows no connection test (its default)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from tests.conftest import Stack
from tests.joey_cli.conftest import error_line, joey


def test_connections_on_the_command_line_never_echo_secrets(stack: Stack, tmp_path: Path) -> None:
    env = os.environ | stack.env
    ws, other = f"cli-conn-{secrets.token_hex(3)}", f"cli-conn-{secrets.token_hex(3)}"
    joey(env, "workspace", "create", ws)
    joey(env, "workspace", "create", other)
    password = f"clipw-{secrets.token_hex(6)}"
    details = tmp_path / "details.json"
    details.write_text(json.dumps({"url": f"postgresql://reader:{password}@db.example.com/sales"}))
    created = joey(
        env, "-w", ws, "connection", "create", "sales", "--type", "postgres",
        "--details-file", str(details), "--detail", "table=orders",
    )  # fmt: skip
    assert created.stdout.strip() == "created postgres connection sales"
    listed = joey(env, "-w", ws, "connection", "list").stdout
    assert "sales" in listed and "reader:***@db.example.com" in listed and password not in listed
    shown = joey(env, "-w", ws, "connection", "get", "sales").stdout
    assert password not in shown and '"table": "orders"' in shown
    full = joey(env, "-w", ws, "connection", "get", "sales", "--show-secrets").stdout
    assert password in full

    refused = error_line(joey(env, "-w", ws, "connection", "test", "sales", check=False))
    assert "JOEY_CONNECTION_TEST_HOSTS" in refused and "'db.example.com'" in refused
    bad = joey(env, "-w", ws, "connection", "create", "x", "--type", "files", "-d", "path=rel", check=False)
    assert "path: must be an absolute directory" in error_line(bad)

    joey(env, "-w", ws, "workspace", "add-connection", other, "sales")
    seen = joey(env, "workspace", "connections", other).stdout
    assert "sales" in seen and ws in seen and password not in seen
    joey(env, "workspace", "remove-connection", other, "sales")
    assert "has no connections" in joey(env, "workspace", "connections", other).stdout
    unasked = joey(env, "-w", ws, "connection", "delete", "sales", check=False)
    assert "pass --yes" in error_line(unasked), "no terminal to confirm in: nothing deleted"
    deleted = joey(env, "-w", ws, "connection", "delete", "sales", "--yes")
    assert deleted.stdout.strip() == "deleted connection sales"
    assert "has no connections" in joey(env, "-w", ws, "connection", "list").stdout
