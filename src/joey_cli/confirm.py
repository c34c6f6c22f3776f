"""Asking before a delete, shared by every command that deletes."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

YES = click.option("--yes", "-y", is_flag=True, help="Delete without asking for confirmation.")


def confirm(yes: bool, what: str, question: Callable[[], str]) -> None:
    """Ask ``question()`` (what the delete removes) unless ``yes``; without a terminal to ask in,
    refuse: a script must say --yes, so nothing is deleted by a pipe or a CI job by accident."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(
            f"not deleting {what}: there is no terminal to confirm in; pass --yes (-y) to delete it"
        )
    click.confirm(question(), abort=True)
