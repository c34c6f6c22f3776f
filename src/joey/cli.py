"""The `joey` command line."""

from __future__ import annotations

import importlib

import click

SERVICES = ("registry", "engine", "logger")


@click.group()
def main() -> None:
    """Joey: Kafka-native MLOps."""


@main.command()
@click.argument("service", type=click.Choice(SERVICES))
def serve(service: str) -> None:
    """Run one service in the foreground (what compose.yaml and production run)."""
    importlib.import_module(f"joey_{service}.app").serve()


if __name__ == "__main__":
    main()
