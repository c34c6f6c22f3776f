"""The connection-type ABC and the registry of types by name."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SecretPath = tuple[str, ...]
"""Where a value sits in a connection's details: ("password",), ("headers", "Authorization")."""

# Names of free-form entries (HTTP headers, properties) whose values are secrets.
_SECRET_NAME = re.compile(
    r"auth|password|passwd|secret|token|api[-_.]?key|cookie|credential|private[-_.]?key|signature|session|jwt"
    r"|^sig$|^key$|[-_.]key$",
    re.I,
)


def secret_name(name: str) -> bool:
    return _SECRET_NAME.search(name) is not None


class InvalidDetails(ValueError):
    """Details refused, naming the field: ``field`` is its dotted path (empty: the details as a whole)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class Details(BaseModel):
    """The base of every type's details: unknown fields are refused, not ignored (a misspelt
    ``pasword`` must not be stored in the clear)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


ROLL_ROWS, ROLL_SECONDS = 10_000, 60.0


class Rolling(Details):
    """How a sink of files rolls them: a file is written once it holds ``roll_rows`` rows or its
    first row is ``roll_seconds`` old, whichever comes first (unset: ROLL_ROWS, ROLL_SECONDS; see
    docs/workloads.md, "Files and S3")."""

    roll_rows: int | None = Field(default=None, ge=1, le=1_000_000)
    roll_seconds: float | None = Field(default=None, gt=0, le=86_400)


@dataclass(frozen=True)
class Report:
    """What a test found: ``ok`` when the connection works as described, ``message`` one sentence
    saying what was found or what failed, ``found`` the facts (counts, names) as JSON values."""

    ok: bool
    message: str
    found: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """What a test will reach, for the registry's policy to allow or refuse before it runs."""

    hosts: tuple[str, ...] = ()
    directories: tuple[str, ...] = ()


class ConnectionType(ABC):
    name: ClassVar[str]
    details: ClassVar[type[Details]]
    secret_fields: ClassVar[frozenset[str]] = frozenset()
    """Top-level fields that are always secret."""
    url_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields holding URLs: secret when they carry a password."""
    named_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields holding a mapping (headers, properties) whose entries are secret by their name."""

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The details, normalised (defaults filled in, unset fields left out), or InvalidDetails
        naming the first bad field."""
        try:
            model = self.details.model_validate(dict(raw))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            problem = error["msg"] if error["type"] != "extra_forbidden" else "unknown field"
            raise InvalidDetails(where, problem) from None
        self.check(model)
        return model.model_dump(mode="json", exclude_none=True)

    @abstractmethod
    def check(self, details: Any) -> None:
        """Checks across fields, beyond what the details' model says; InvalidDetails if one fails."""

    @abstractmethod
    def probe(self, details: Mapping[str, Any]) -> Probe:
        """The hosts and directories :meth:`test` would reach."""

    @abstractmethod
    def test(self, details: Mapping[str, Any], timeout_s: float) -> Report:
        """Connect and report what was found, within about ``timeout_s``; failures to reach or read are a
        Report that is not ok, not an exception."""


TYPES: dict[str, ConnectionType] = {}

T = TypeVar("T", bound=type[ConnectionType])


def register(cls: T) -> T:
    TYPES[cls.name] = cls()
    return cls


def connection_type(name: str) -> ConnectionType:
    found = TYPES.get(name)
    if found is None:
        raise InvalidDetails("type", f"unknown connection type {name!r}; one of {', '.join(sorted(TYPES))}")
    return found


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for a report."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
