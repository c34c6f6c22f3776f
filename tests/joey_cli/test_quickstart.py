"""docs/quickstart.md, run as a newcomer would: every block, in order, against a real `joey up`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.joey_cli.conftest import CliStack, joey

QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", QUICKSTART.read_text(), re.S)


def test_the_page_walks_through_start_train_deploy_infer_logs_assay_stop() -> None:
    text = "\n".join(code for _, code in blocks())
    for step in (
        "joey up --detach",
        "upload_model",
        "deploy()",
        "infer(features)",
        "joey logs",
        "interactive_run",
        "joey down",
    ):
        assert step in text, step


def test_the_first_hour_runs_as_written(cli_stack: CliStack, tmp_path: Path) -> None:
    # The page starts Joey itself: stop the shared stack first (the next test starts it again).
    joey(cli_stack.env, "down")
    env = cli_stack.env | {"PATH": f"{Path(sys.executable).parent}:{cli_stack.env['PATH']}"}
    for number, (language, code) in enumerate(blocks(), 1):
        command = (
            ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        )
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (
            f"block {number} ({language}) failed:\n{code}\n{result.stdout}\n{result.stderr}"
        )
    assert joey(cli_stack.env, "status", check=False).returncode != 0, "the page ends with Joey stopped"
