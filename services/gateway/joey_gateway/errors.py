"""Failures of a gateway call, named once and mapped to gRPC and HTTP status by the transports."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    INVALID_ARGUMENT = 400
    UNAUTHENTICATED = 401
    PERMISSION_DENIED = 403
    NOT_FOUND = 404
    TOO_LARGE = 413
    UNSUPPORTED_MEDIA_TYPE = 415
    RESOURCE_EXHAUSTED = 429
    DEADLINE_EXCEEDED = 504
    UNAVAILABLE = 503
    INTERNAL = 500

    @property
    def http(self) -> int:
        return self.value


class GatewayError(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
