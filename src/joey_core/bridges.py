"""Bridge definitions as joey.bridges carries them, shared by the registry (which publishes them) and
the connector-bridge (which follows them): what a source or a sink may be, and how each is named."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joey_core import topics
from joey_core.connections import InvalidDetails

SOURCE, SINK = "source", "sink"
KINDS = (SOURCE, SINK)

INPUTS, OUTPUTS, ERRORS, LOGS = "inputs", "outputs", "errors", "logs"
WHAT: dict[str, tuple[str, ...]] = {SOURCE: (INPUTS,), SINK: (OUTPUTS, ERRORS, LOGS)}
"""What each kind moves: a source a pipeline's inputs; a sink its results (``outputs``: every output and
every error, one row per input), its errors only, or its inference logs (joey.logs, one row per
inference the engine logged)."""
DEFAULT_WHAT = {SOURCE: INPUTS, SINK: OUTPUTS}

SUPPORTED: dict[str, tuple[str, ...]] = {
    SOURCE: ("postgres", "files", "s3", "kafka"),
    SINK: ("postgres", "files", "s3", "kafka", "http"),
}
"""The connection types each kind takes (the connector-bridge's SOURCES and SINKS)."""

# States a bridge reports (bridge_status.state); a paused one is shown paused whatever it last said.
WAITING, RUNNING, RETRYING, PAUSED = "waiting", "running", "retrying", "paused"


def check_details(kind: str, connection_type: str, details: Mapping[str, Any]) -> None:
    """InvalidDetails when a connection of that type cannot serve as this kind of bridge."""
    if connection_type == "postgres":
        if details.get("query"):
            raise InvalidDetails("query", f"a {kind} reads or writes a table, not a query")
        if not details.get("table"):
            raise InvalidDetails("table", f"a {kind} needs the connection's table")
        if kind == SOURCE and not details.get("key"):
            raise InvalidDetails("key", "a source needs the table's key column: the order it reads in")
    if connection_type in ("files", "s3") and kind == SINK and details.get("format", "parquet") != "parquet":
        raise InvalidDetails("format", "a sink writes Parquet files: leave format unset or parquet")
    if connection_type == "kafka" and not details.get("topic"):
        raise InvalidDetails("topic", f"a {kind} needs the connection's topic")


def bridge_key(workspace: str, name: str) -> str:
    return f"{workspace}/{name}"


@dataclass(frozen=True)
class BridgeSpec:
    """One bridge as published; ``id`` is its row's, new for every bridge created, so a bridge created
    again under a deleted one's name starts afresh (its own consumer group and position)."""

    id: int
    workspace: str
    name: str
    kind: str
    pipeline: str
    connection: str
    what: str
    paused: bool = False
    from_pipeline: str = ""
    """A source of this pipeline's outputs, instead of a connection's records."""

    @property
    def key(self) -> str:
        return bridge_key(self.workspace, self.name)

    @property
    def topics(self) -> topics.PipelineTopics:
        return topics.pipeline_topics(self.workspace, self.pipeline)

    @property
    def group(self) -> str:
        """A sink's consumer group: the connector-bridges running it share the partitions."""
        return f"joey.bridge.{self.workspace}.{self.name}.{self.id}"


def parse(value: bytes) -> BridgeSpec:
    """A published spec, or ValueError: whoever can write the topic must not stop a connector-bridge."""
    raw = json.loads(value)
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        found = BridgeSpec(
            int(raw["id"]),
            str(raw["workspace"]),
            str(raw["name"]),
            str(raw["kind"]),
            str(raw["pipeline"]),
            str(raw["connection"]),
            str(raw["what"]),
            bool(raw.get("paused", False)),
            str(raw.get("from_pipeline", "")),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"missing or bad field {exc}") from None
    if found.kind not in KINDS or found.what not in WHAT[found.kind]:
        raise ValueError(f"a {found.kind!r} bridge of {found.what!r}")
    for kind, name in (("workspace", found.workspace), ("bridge", found.name), ("pipeline", found.pipeline)):
        topics.validate_name(kind, name)
    if found.from_pipeline:
        topics.validate_name("pipeline", found.from_pipeline)
    return found
