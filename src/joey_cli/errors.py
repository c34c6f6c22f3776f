"""How a command's error reaches the user: one `Error:` line naming what failed and what to do."""

from __future__ import annotations

import socket
import sys
from typing import Any, NoReturn

import click


def error_line(exc: BaseException, obj: Any) -> str | None:
    """The line an SDK or gRPC error becomes; None for any other exception (a bug: its traceback shows).

    ``obj`` is the command's context object (its ``registry_addr`` names the registry called)."""
    # Only a module a failing command has loaded can have raised: importing the SDK here would cost
    # every command that failed otherwise a second.
    calls = sys.modules.get("joey.client.calls")
    grpc = sys.modules.get("grpc")
    if calls is not None and isinstance(exc, calls.JoeyError):
        code, text = exc.code, str(exc)
    elif grpc is not None and isinstance(exc, grpc.RpcError):
        # A bare RpcError (not a call's outcome) has neither code() nor details().
        status = getattr(exc, "code", None)
        code = status().name if callable(status) else "UNKNOWN"
        details = getattr(exc, "details", None)
        text = f"{(details() if callable(details) else str(exc)) or type(exc).__name__} ({code})"
    else:
        return None
    addr = getattr(obj, "registry_addr", None)
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and addr and not listening(addr):
        # Only then: the registry itself answers UNAVAILABLE when Kafka or Redis fail it.
        return (
            f"cannot reach the registry at {addr}: is Joey running? Start it with `joey up`, "
            "or point --registry / JOEY_REGISTRY_ADDR at a running registry"
        )
    return text


def listening(addr: str, timeout: float = 2.0) -> bool:
    """Whether something accepts connections at ``host:port`` (a wildcard address: on the loopback)."""
    host, _, port = addr.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host.strip("[]")  # noqa: S104
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def fail(exc: Exception) -> NoReturn:
    """End the command with ``exc`` as one `Error:` line."""
    ctx = click.get_current_context(silent=True)
    raise click.ClickException(error_line(exc, ctx.obj if ctx else None) or str(exc)) from None
