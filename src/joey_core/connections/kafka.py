"""``kafka``: a topic of an external Kafka cluster, with its security settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from pydantic import Field

from joey_core.connections.base import ConnectionType, Details, InvalidDetails, Probe, Report, register


class KafkaDetails(Details):
    bootstrap: str = Field(min_length=1, max_length=4096, pattern=r"^[^\s,]+:\d+(,[^\s,]+:\d+)*$")
    """host:port[,host:port...]"""
    topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_ca_pem: str | None = Field(default=None, max_length=65536)
    """The CA certificates to trust, as PEM text (never a path: it would name a file of the host)."""


@register
class Kafka(ConnectionType):
    name = "kafka"
    details = KafkaDetails
    secret_fields = frozenset({"sasl_password"})

    def check(self, details: Any) -> None:
        assert isinstance(details, KafkaDetails)
        sasl = details.security_protocol.startswith("SASL")
        if sasl and not (details.sasl_mechanism and details.sasl_username and details.sasl_password):
            missing = next(
                f for f in ("sasl_mechanism", "sasl_username", "sasl_password") if not getattr(details, f)
            )
            raise InvalidDetails(missing, f"required with security_protocol {details.security_protocol}")
        if not sasl and (details.sasl_mechanism or details.sasl_username or details.sasl_password):
            raise InvalidDetails("security_protocol", "SASL settings need SASL_PLAINTEXT or SASL_SSL")

    def probe(self, details: Mapping[str, Any]) -> Probe:
        return Probe(hosts=tuple(a.rsplit(":", 1)[0].strip("[]") for a in details["bootstrap"].split(",")))

    def test(self, details: Mapping[str, Any], timeout_s: float) -> Report:
        topic = details.get("topic")
        try:
            admin = AdminClient(client_config(details) | {"socket.timeout.ms": int(timeout_s * 1000)})
            # Every topic's metadata: asking for one by name may create it on a broker that auto-creates.
            metadata = admin.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            reason = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
            return Report(False, f"cannot reach the cluster at {details['bootstrap']}: {reason}")
        brokers = len(metadata.brokers)
        if not topic:
            return Report(True, f"reached the cluster: {brokers} brokers", {"brokers": brokers})
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            reason = found.error.str() if found is not None and found.error else "unknown topic"
            return Report(False, f"topic {topic!r} is not there: {reason}", {"topic": topic, "exists": False})
        partitions = len(found.partitions)
        return Report(
            True,
            f"topic {topic!r} exists: {partitions} partitions on a cluster of {brokers} brokers",
            {"topic": topic, "exists": True, "partitions": partitions, "brokers": brokers},
        )


def client_config(details: Mapping[str, Any]) -> dict[str, Any]:
    """librdkafka settings of a connection's cluster (its own, never the platform's)."""
    config: dict[str, Any] = {
        "bootstrap.servers": details["bootstrap"],
        "security.protocol": details.get("security_protocol", "PLAINTEXT"),
    }
    for key, option in (
        ("sasl_mechanism", "sasl.mechanism"),
        ("sasl_username", "sasl.username"),
        ("sasl_password", "sasl.password"),
        ("ssl_ca_pem", "ssl.ca.pem"),
    ):
        if details.get(key):
            config[option] = details[key]
    return config
