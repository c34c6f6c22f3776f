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


def call_rpc(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            raise JoeyError(
                code.name, f"registry unreachable: {exc.details()}; is the stack up (`joey up`)?"
            ) from None  # type: ignore[attr-defined]
        raise JoeyError(code.name, exc.details()) from None  # type: ignore[attr-defined]


class RegistryCaller(Protocol):
    """What pipelines, assays and builders need from the :class:`joey.Client` that made them."""

    workspace: str
    settings: CommonSettings

    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...
