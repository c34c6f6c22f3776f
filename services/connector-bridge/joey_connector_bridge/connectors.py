"""What a source and a sink are, whatever the store: small ABCs, registered by connection type, so a new
store (files, s3, kafka, http) plugs in as a module with a :func:`register_source` / :func:`register_sink`.

Both raise :class:`Unavailable` for anything worth retrying (the store is down or refuses): the bridge
then pauses, says why in its status, and retries the same step, so nothing is skipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


class Unavailable(Exception):
    """The store cannot take or give records now; the message says why (never a secret)."""


@dataclass(frozen=True)
class ResultRow:
    """One result of a pipeline, as a sink stores it: the row of its request id."""

    request_id: str
    source_key: str | None
    """The source row's key, when the record came from a source."""
    time: str | None
    outputs: dict[str, Any] | None
    error: str | None
    pipeline_version: int | None


class Sink(ABC):
    """Writes results to one store: a write is durable once :meth:`write` returns, and idempotent by
    request id (a replayed batch changes nothing), so offsets are committed after it."""

    type: ClassVar[str]

    def __init__(self, details: Mapping[str, Any]) -> None:
        self.details = details

    @abstractmethod
    def write(self, rows: Sequence[ResultRow]) -> None: ...

    def close(self) -> None:  # noqa: B027 (a sink without a connection has nothing to close)
        pass


@dataclass(frozen=True)
class SourceRecord:
    """One record read from a source: its key (the request id is ``<source>/<key>``), the position to
    checkpoint once it is acknowledged, and the pipeline input it becomes."""

    key: str
    position: Any
    inputs: dict[str, Any]


class Source(ABC):
    """Reads records in a stable order after a position: every record, existing and new, once the
    position of the last one acknowledged is checkpointed."""

    type: ClassVar[str]

    def __init__(self, details: Mapping[str, Any]) -> None:
        self.details = details

    @abstractmethod
    def read(self, after: Any, limit: int) -> list[SourceRecord]:
        """Up to ``limit`` records after position ``after`` (None: from the start), in order."""

    @abstractmethod
    def lag(self, after: Any) -> int:
        """How many records are after ``after``."""

    def close(self) -> None:  # noqa: B027
        pass


SINKS: dict[str, type[Sink]] = {}
SOURCES: dict[str, type[Source]] = {}
T = TypeVar("T", bound=type[Sink] | type[Source])


def _register(table: dict[str, Any]) -> Callable[[T], T]:
    def add(cls: T) -> T:
        table[cls.type] = cls
        return cls

    return add


register_sink = _register(SINKS)
register_source = _register(SOURCES)
