"""Settings of the connector-bridge service."""

from __future__ import annotations

from pydantic import Field, SecretStr

from joey_core.settings import DatabaseSettings, ServiceSettings


class BridgeSettings(ServiceSettings, DatabaseSettings):
    service_token: SecretStr | None = None
    """The registry's JOEY_SERVICE_TOKEN: presented to read the connections of the bridges it runs."""

    batch_size: int = Field(default=500, ge=1)
    """Most records a sink writes, or a source sends, in one step (one transaction, one flush)."""

    poll_interval_s: float = Field(default=0.5, gt=0)
    """How long a sink waits for records, and a source between reads that found no new rows."""

    status_interval_s: float = Field(default=1.0, gt=0)
    """How often a running bridge's status (rows moved, lag) is written for the registry to show."""

    retry_backoff_max_s: float = Field(default=10.0, gt=0)
    """Longest pause before a step is retried while the external store or the broker refuses it."""

    sink_statement_timeout_s: float = Field(default=60.0, gt=0, lt=300)
    """Longest a Postgres sink's write may take (a table locked by someone else) before it fails and is
    retried: below the consumer's max.poll.interval.ms (300 s), so a blocked write never costs the sink
    its partitions."""

    delivery_timeout_s: float = Field(default=30.0, gt=0)
    """Longest wait for the broker to acknowledge a source's batch before it is sent again."""

    metrics_port: int | None = None
    """Port of the Prometheus endpoint; none when unset."""
