"""Bridges: the source and sink verbs of :class:`joey.Client` and the :class:`Bridge` they return::

client.create_source("wine-feed", connection="wine-db", pipeline="wine")    # rows -> pipeline inputs
client.create_sink("wine-results", pipeline="wine", connection="wine-out")  # results -> a table
client.list_bridges()
bridge.status()                  # state, rows moved, lag, last error
bridge.pause(); bridge.resume(); bridge.delete()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from joey.client.calls import RegistryCaller
from joey.client.catalog import Listing, optional_time
from joey_core.v1 import registry_pb2 as pb


@dataclass(frozen=True)
class BridgeStatus:
    """What the connector-bridge running a bridge last reported; ``str()`` is its state.

    ``state``: waiting (no connector-bridge runs it yet), running, retrying (the external store or the
    broker refuses: ``last_error`` says why; nothing is lost, it resumes where it stopped) or paused.
    ``lag``: records not moved yet, as last seen (-1: unknown)."""

    state: str
    rows_moved: int
    lag: int
    last_error: str
    instance: str
    updated_at: datetime | None

    @classmethod
    def from_proto(cls, s: pb.BridgeStatus) -> BridgeStatus:
        return cls(s.state, s.rows_moved, s.lag, s.last_error, s.instance, optional_time(s.updated_at))

    def __str__(self) -> str:
        return self.state + (f": {self.last_error}" if self.last_error else "")


@dataclass(frozen=True)
class Bridge:
    """A source or sink of the workspace; ``str()`` is its name."""

    client: RegistryCaller = field(repr=False, compare=False)
    workspace: str
    name: str
    kind: str
    pipeline: str
    connection: str
    what: str
    paused: bool
    created_by: str = ""
    created_at: datetime | None = None
    last_status: BridgeStatus | None = field(default=None, compare=False)
    """As of the call that returned this object; :meth:`status` asks again."""
    from_pipeline: str = ""
    """A source of that pipeline's results (then ``connection`` is empty)."""

    @classmethod
    def from_proto(cls, client: RegistryCaller, b: pb.Bridge) -> Bridge:
        return cls(
            client,
            b.workspace,
            b.name,
            b.kind,
            b.pipeline,
            b.connection,
            b.what,
            b.paused,
            b.created_by,
            optional_time(b.created_at),
            BridgeStatus.from_proto(b.status),
            b.from_pipeline,
        )

    def __str__(self) -> str:
        return self.name

    def row(self) -> dict[str, Any]:
        s = self.last_status
        return {
            "name": self.name,
            "kind": self.kind,
            "pipeline": self.pipeline,
            "connection": self.connection or f"pipeline {self.from_pipeline}",
            "what": self.what,
            "state": s.state if s else "-",
            "rows_moved": s.rows_moved if s else 0,
            "lag": s.lag if s and s.lag >= 0 else "-",
            "last_error": (s.last_error if s else "") or "-",
        }

    def _request(self) -> pb.BridgeRequest:
        return pb.BridgeRequest(workspace=self.workspace, name=self.name)

    def status(self) -> BridgeStatus:
        return BridgeStatus.from_proto(self.client.call("GetBridgeStatus", self._request()).status)

    def pause(self) -> Bridge:
        """Stop moving records (a sink keeps its offsets, a source its position) until :meth:`resume`."""
        return Bridge.from_proto(self.client, self.client.call("PauseBridge", self._request()))

    def resume(self) -> Bridge:
        return Bridge.from_proto(self.client, self.client.call("ResumeBridge", self._request()))

    def delete(self) -> None:
        """Delete the bridge; what it wrote stays where it wrote it."""
        self.client.call("DeleteBridge", self._request())


class BridgeClientMixin(ABC):
    """The bridge verbs of :class:`joey.Client`, which provides ``workspace`` and ``call``."""

    workspace: str

    @abstractmethod
    def call(self, name: str, request: Any, timeout: float = 60.0) -> Any: ...

    def _create_bridge(
        self, name: str, kind: str, pipeline: Any, connection: Any, what: str, from_pipeline: Any = None
    ) -> Bridge:
        request = pb.BridgeCreateRequest(
            workspace=self.workspace,
            name=name,
            kind=kind,
            pipeline=str(pipeline),
            connection="" if connection is None else str(connection),
            what=what,
            from_pipeline="" if from_pipeline is None else str(from_pipeline),
        )
        return Bridge.from_proto(self, self.call("CreateBridge", request))  # type: ignore[arg-type]

    def create_source(
        self, name: str, connection: Any = None, pipeline: Any = None, from_pipeline: Any = None
    ) -> Bridge:
        """Stream the records of ``connection``, existing and new, into ``pipeline``'s inputs: a Postgres
        table's rows in key order (request id ``<name>/<key>``), the rows of the CSV, JSON-lines or
        Parquet files of a directory or S3 prefix in name order (``<name>/<file>/<row>``), or an
        external Kafka topic's records (``<name>/<partition>/<offset>``).

        Or, instead of a connection, ``from_pipeline``: that pipeline's results, each one's outputs
        becoming one input record of ``pipeline`` (``<name>/<its request id>``), so the two pipelines
        chain as a stream."""
        return self._create_bridge(name, "source", pipeline, connection, "inputs", from_pipeline)

    def create_sink(self, name: str, pipeline: Any, connection: Any, what: str = "outputs") -> Bridge:
        """Write ``pipeline``'s results into ``connection``, one row per request id: a Postgres table
        (created if absent), Parquet files in a directory or S3 prefix, records of an external Kafka
        topic keyed by request id, or POSTs to a URL. ``what``: ``outputs`` (every result, errors
        included), ``errors``, or ``logs`` (the pipeline's inference logs)."""
        return self._create_bridge(name, "sink", pipeline, connection, what)

    def list_bridges(self) -> Listing[Bridge]:
        response = self.call("ListBridges", pb.BridgeListRequest(workspace=self.workspace))
        return Listing(Bridge.from_proto(self, b) for b in response.bridges)  # type: ignore[arg-type]

    def get_bridge(self, name: str | Bridge) -> Bridge:
        request = pb.BridgeRequest(workspace=self.workspace, name=str(name))
        return Bridge.from_proto(self, self.call("GetBridgeStatus", request))  # type: ignore[arg-type]
