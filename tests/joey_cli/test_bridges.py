"""`joey source ...` and `joey sink ...` as a user runs them, against the session's registry (no
connector-bridge runs them here: their state stays waiting)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tests.conftest import Stack
from tests.joey_cli.conftest import error_line, joey


def test_sources_and_sinks_on_the_command_line(stack: Stack, iris_model: Path) -> None:
    env = os.environ | stack.env
    ws = f"cli-bridge-{secrets.token_hex(3)}"
    joey(env, "workspace", "create", ws)
    joey(env, "-w", ws, "model", "upload", "iris", str(iris_model))
    joey(env, "-w", ws, "pipeline", "create", "scored", "--model", "iris")
    url = "postgresql://reader@db.example.com/sales"
    joey(env, "-w", ws, "connection", "create", "rows", "--type", "postgres", "-d", f"url={url}",
         "-d", "table=orders", "-d", "key=id")  # fmt: skip
    joey(env, "-w", ws, "connection", "create", "scores", "--type", "postgres", "-d", f"url={url}",
         "-d", "table=scores")  # fmt: skip

    made = joey(env, "-w", ws, "source", "create", "orders", "--connection", "rows", "--pipeline", "scored")
    assert made.stdout.strip() == "created source orders: rows -> scored"
    made = joey(
        env, "-w", ws, "sink", "create", "scored-out", "--pipeline", "scored", "--connection", "scores"
    )
    assert made.stdout.strip() == "created sink scored-out: scored outputs -> scores"
    sinks = joey(env, "-w", ws, "sink", "list").stdout
    assert "scored-out" in sinks and "orders" not in sinks
    assert "orders" in joey(env, "-w", ws, "source", "list").stdout
    assert joey(env, "-w", ws, "sink", "status", "scored-out").stdout.startswith(
        "scored-out: waiting, 0 rows"
    )
    assert joey(env, "-w", ws, "sink", "pause", "scored-out").stdout.strip() == "paused sink scored-out"
    assert "paused" in joey(env, "-w", ws, "sink", "status", "scored-out").stdout
    assert joey(env, "-w", ws, "sink", "resume", "scored-out").stdout.strip() == "resumed sink scored-out"
    wrong = joey(env, "-w", ws, "sink", "delete", "orders", check=False)
    assert wrong.returncode != 0 and "'orders' is a source" in wrong.stderr
    bad = joey(
        env, "-w", ws, "source", "create", "x", "--connection", "scores", "--pipeline", "scored", check=False
    )
    assert "key" in error_line(bad)
    joey(env, "-w", ws, "pipeline", "create", "after", "--model", "iris")
    chained = joey(
        env, "-w", ws, "source", "create", "chain", "--from-pipeline", "scored", "--pipeline", "after"
    )
    assert chained.stdout.strip() == "created source chain: pipeline scored -> after"
    neither = joey(env, "-w", ws, "source", "create", "y", "--pipeline", "after", check=False)
    assert neither.returncode == 2 and "one of --connection or --from-pipeline" in neither.stderr
    assert joey(env, "-w", ws, "source", "delete", "chain").stdout.strip() == "deleted source chain"
    assert joey(env, "-w", ws, "sink", "delete", "scored-out").stdout.strip() == "deleted sink scored-out"
    assert joey(env, "-w", ws, "source", "delete", "orders").stdout.strip() == "deleted source orders"
    assert "has no sources" in joey(env, "-w", ws, "source", "list").stdout
