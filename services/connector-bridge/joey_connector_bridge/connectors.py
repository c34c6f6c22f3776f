"""What a source and a sink are, whatever the store: small ABCs, registered by connection type, so a
store (postgres, files, s3, kafka, http) plugs in as a module with a :func:`register_source` /
:func:`register_sink`.

Both raise :class:`Unavailable` for anything worth retrying (the store is down or refuses): the bridge
then pauses, says why in its status, and retries the same step, so nothing is skipped. A sink raises
:class:`Refused` for rows the store will never take (an HTTP 400, a record too large): retrying cannot
help, so the bridge reports them and moves on. An answer that a change of the store's side mends (not
authorized, not found, moved) is Unavailable: the bridge waits for the mend, losing nothing.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from joey_connector_bridge.settings import BridgeSettings
from joey_core.bridges import BridgeSpec


class Unavailable(Exception):
    """The store cannot take or give records now; the message says why (never a secret)."""


class Refused(Exception):
    """The store refused rows for good (retrying the same request gets the same answer); the message
    says why (never a secret). ``rows`` is how many of the batch it refused: the rest are written."""

    def __init__(self, why: str, rows: int) -> None:
        super().__init__(why)
        self.rows = rows


@dataclass(frozen=True)
class Bridge:
    """What a source or sink knows of the bridge it serves, beside its connection's details."""

    spec: BridgeSpec
    settings: BridgeSettings


Partition = tuple[str, int]
"""(topic, partition) of the records a sink reads."""


@dataclass(frozen=True)
class ResultRow:
    """One result of a pipeline, as a sink stores it: the row of its request id, and where it was read
    (a file sink names its files by the offsets they hold)."""

    request_id: str
    source_key: str | None
    """The source row's key, when the record came from a source."""
    time: str | None
    outputs: dict[str, Any] | None
    error: str | None
    pipeline_version: int | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    """The log record's Kafka timestamp: a replay reads it again, a new life of the topic (its offsets
    from 0 again) has others, so a file sink tells its own leftovers from older results by it."""

    def columns(self) -> dict[str, Any]:
        """The columns every sink stores (outputs as JSON text where the store has no JSON type)."""
        return {
            "request_id": self.request_id,
            "source_key": self.source_key,
            "time": self.time,
            "outputs": self.outputs,
            "error": self.error,
            "pipeline_version": self.pipeline_version,
        }


class Sink(ABC):
    """Writes results to one store, idempotently by request id (a replayed batch changes nothing). Rows
    are durable once :meth:`write` returns, except those :meth:`held` names (a rolling sink's open
    files): offsets are committed up to what is durable only. After an Unavailable, :meth:`write` is
    called again with the same rows."""

    type: ClassVar[str]

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        self.details = details
        self.bridge = bridge

    @abstractmethod
    def write(self, rows: Sequence[ResultRow]) -> None: ...

    def held(self) -> dict[Partition, int]:
        """Per partition, the first offset of rows taken but not durable yet."""
        return {}

    def tick(self) -> None:  # noqa: B027 (a sink writing at once has nothing due later)
        """Write what became due with time alone; called at every step, with records or not."""

    def revoked(self, partitions: Sequence[Partition]) -> None:  # noqa: B027
        """The group gave these partitions to another member: forget rows held of them."""

    def close(self) -> None:  # noqa: B027 (a sink without a connection has nothing to close)
        pass


@dataclass(frozen=True)
class SourceRecord:
    """One record read from a source: its key (the request id is ``<source>/<key>``), the position to
    checkpoint once it and every record before it are acknowledged, and the input record's value."""

    key: str
    position: Any
    value: bytes

    @classmethod
    def of(cls, key: str, position: Any, inputs: Mapping[str, Any]) -> SourceRecord:
        """A record of ``inputs`` (input name -> value), encoded as the pipeline's inputs topic takes."""
        return cls(key, position, json.dumps({k: json_value(v) for k, v in inputs.items()}).encode())


class Source(ABC):
    """Reads records in a stable order after a position: every record, existing and new, once the
    position of the last one acknowledged is checkpointed."""

    type: ClassVar[str]

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        self.details = details
        self.bridge = bridge

    @abstractmethod
    def read(self, after: Any, limit: int) -> list[SourceRecord]:
        """Up to ``limit`` records after position ``after`` (None: from the start), in order."""

    @abstractmethod
    def lag(self, after: Any) -> int:
        """How many records are after ``after`` (-1: unknown)."""

    def warning(self) -> str:
        """What the bridge's status shows while the source runs: something it did that its user should
        know of (none: empty)."""
        return ""

    def acknowledged(self, position: Any) -> None:  # noqa: B027 (most sources keep no position of their own)
        """Called once the records up to ``position`` are acknowledged and the position checkpointed:
        a source whose store keeps its readers' positions (a Kafka group) commits it there."""

    def close(self) -> None:  # noqa: B027
        pass


def json_value(value: Any) -> Any:
    """A store's value as JSON can carry it: lists (arrays) stay lists, i.e. tensors."""
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return value


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
