"""The services, in the order `joey up` starts them; `joey serve` runs one. Its own module, so that the
command line names them without loading the stack's code."""

SERVICES = ("registry", "engine", "logger", "assayer", "gateway", "connector-bridge", "orchestrator")

DATABASE_SERVICES = frozenset({"registry", "logger", "assayer", "connector-bridge", "orchestrator"})
"""The services given the database URL; the others (engine, gateway) use no database."""


def module(service: str) -> str:
    """The package a service runs as (``python -m``): connector-bridge is joey_connector_bridge."""
    return f"joey_{service.replace('-', '_')}"
