"""How a command's error reaches the user: one `Error:` line naming what failed and what to do."""

from __future__ import annotations

import socket
import sys
from typing import Any, NoReturn

import click


def registry_addr(obj: Any) -> str:
    """The address the command's client calls (or would call)."""
    addr = getattr(obj, "registry_addr", None)
    if addr:
        return str(addr)
    from joey_core.settings import CommonSettings

    return CommonSettings().registry_addr


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
        code = exc.code().name  # type: ignore[attr-defined]
        text = f"{exc.details()} ({code})"  # type: ignore[attr-defined]
    else:
        return None
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and not _listening(addr := registry_addr(obj)):
        # Only then: the registry itself answers UNAVAILABLE when Kafka or Redis fail it.
        return (
            f"cannot reach the registry at {addr}: is Joey running? Start it with `joey up`, "
            "or point --registry / JOEY_REGISTRY_ADDR at a running registry"
        )
    return text


def _listening(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def fail(exc: Exception) -> NoReturn:
    """End the command with ``exc`` as one `Error:` line."""
    ctx = click.get_current_context(silent=True)
    raise click.ClickException(error_line(exc, ctx.obj if ctx else None) or str(exc)) from None
