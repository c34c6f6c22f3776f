"""What `joey` tells about itself: help on every command and option, its version, shell completion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click

from joey_cli.commands import main
from tests.joey_cli.conftest import joey


def undocumented(command: click.Command, path: str) -> list[str]:
    found = [] if (command.help or command.short_help) else [f"{path}: the command"]
    found += [
        f"{path}: {param.opts[-1]}"
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += undocumented(sub, f"{path} {name}")
    return found


def test_every_command_and_option_has_help() -> None:
    assert not undocumented(main, "joey"), "\n".join(["add help text to:", *undocumented(main, "joey")])


def test_version() -> None:
    result = joey(dict(os.environ), "--version")
    assert result.stdout.splitlines() == [f"joey {version('joey')}"]


def test_bash_completion_completes_commands(tmp_path: Path) -> None:
    script = joey(dict(os.environ), "completion", "bash").stdout
    assert "_JOEY_COMPLETE=bash_complete" in script
    # The script as a shell runs it: the venv's `joey` answers with the words that fit.
    bash = shutil.which("bash")
    assert bash, "bash is needed to run the completion script"
    (tmp_path / "joey.bash").write_text(script)
    # bash calls the function with the command's name, after `joey pipeline dep` is typed.
    typed = "source joey.bash; COMP_WORDS=(joey pipeline dep); COMP_CWORD=2; _joey_completion joey; "
    typed += 'echo "${COMPREPLY[@]}"'
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [bash, "-c", typed], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["deploy"]


def test_completion_refuses_an_unknown_shell() -> None:
    result = joey(dict(os.environ), "completion", "tcsh", check=False)
    assert result.returncode == 2
    assert "Invalid value for '{bash|zsh|fish}'" in result.stderr, result.stderr
    for shell in ("zsh", "fish"):
        assert "_JOEY_COMPLETE" in joey(dict(os.environ), "completion", shell).stdout
