"""Typed failures of the registry core; the transport maps each to one gRPC status code."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error a caller is meant to see; the message is shown verbatim."""


class NotFound(RegistryError):
    pass


class WorkspaceNotFound(NotFound):
    """A missing workspace, or one hidden from a non-member: the same answer for both."""

    def __init__(self, workspace: str) -> None:
        super().__init__(f"workspace {workspace!r} not found")


class InvalidArgument(RegistryError):
    pass


class FailedPrecondition(RegistryError):
    pass


class AlreadyExists(RegistryError):
    pass


class Unauthenticated(RegistryError):
    pass


class PermissionDenied(RegistryError):
    pass


class Unavailable(RegistryError):
    """A dependency (the broker) did not answer; retrying later may succeed."""


class ResourceExhausted(RegistryError):
    """Too many such calls at once; retrying shortly may succeed."""


class DeadlineExceeded(RegistryError):
    """A call took longer than its limit (a stalled upload); nothing it sent was kept."""
