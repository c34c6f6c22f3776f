"""How the SDK calls the registry: one error type, and the protocol the SDK's objects need from
their client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import grpc

from joey_core.settings import CommonSettings


class JoeyError(Exception):
    """An error reported by the registry, with the gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


LOGIN_HOW = "log in with `joey login` (or joey.Client.login(username, password) in Python)"


def call_rpc(fn: Callable[..., Any], *args: Any, token_sent: str = "", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its gRPC error raised as a :class:`JoeyError`. An UNAUTHENTICATED error
    also says which token was sent (``token_sent``: where it came from) and how to log in."""
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            raise JoeyError(
                code.name, f"registry unreachable: {details}; is the stack up (`joey up`)?"
            ) from None
        if code == grpc.StatusCode.UNAUTHENTICATED and token_sent:
            how = "" if "joey login" in details else f": {LOGIN_HOW}"
            raise JoeyError(code.name, f"{details}; {token_sent}{how}") from None
        raise JoeyError(code.name, details) from None


class RegistryCaller(Protocol):
    """What pipelines, assays and builders need from the :class:`joey.Client` that made them."""

    workspace: str
    settings: CommonSettings

    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...
