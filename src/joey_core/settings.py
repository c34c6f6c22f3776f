"""Settings shared by every Joey process.

Each service subclasses :class:`ServiceSettings` with its own fields, plus :class:`DatabaseSettings` if
it uses Postgres and :class:`TlsServerSettings` if it serves gRPC or HTTP: a service is given only the
credentials it uses. The SDK and the CLI use :class:`CommonSettings`. A settings object is built once at
start (``XSettings()`` reads ``JOEY_*`` environment variables) and passed down; nothing below the entry
points reads the environment.

Secrets (URLs that may carry a password, the SASL password) are ``SecretStr``: a settings object's repr,
and anything that prints it, shows ``**********``; :mod:`joey_core.redaction` scrubs them from logs.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_serializer, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from joey_core.redaction import MASK, secret_key

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"]

# librdkafka properties JOEY_KAFKA_CONFIG may not set: each has a setting of its own (one source of
# truth, and the password stays a SecretStr), or Joey's delivery guarantees rest on Joey's value.
_KAFKA_OWN_SETTINGS = {
    "bootstrap.servers": "JOEY_KAFKA_BOOTSTRAP",
    "security.protocol": "JOEY_KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "JOEY_KAFKA_SASL_MECHANISM",
    "sasl.mechanisms": "JOEY_KAFKA_SASL_MECHANISM",
    "sasl.username": "JOEY_KAFKA_SASL_USERNAME",
    "sasl.password": "JOEY_KAFKA_SASL_PASSWORD",
    "ssl.ca.location": "JOEY_KAFKA_SSL_CA_LOCATION",
}
_KAFKA_JOEY_OWNED = {
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "isolation.level",
    "transactional.id",
}


class CommonSettings(BaseSettings):
    # Inputs hidden from validation errors: a refused setting's error must not quote the secrets beside it.
    model_config = SettingsConfigDict(
        env_prefix="JOEY_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers. The default is where `joey up` starts the embedded broker."""

    stream_idle_s: float = 30.0
    """The SDK closes a pipeline's producer and reply reader (the gateway its reply reader) after this
    long without a call (the next call opens them again): an idle reader still holds the pipeline's
    topics (see docs/reliability.md)."""

    kafka_dev_timeouts: bool = True
    """Short consumer-group session timeouts (4 s / 0.5 s heartbeat) so groups form fast.
    Valid on real Kafka too; turn off for large production groups."""

    kafka_security_protocol: KafkaSecurityProtocol | None = None
    """librdkafka's security.protocol; unset is PLAINTEXT. SASL_SSL for a cluster with users and TLS."""

    kafka_sasl_mechanism: KafkaSaslMechanism | None = None
    """librdkafka's sasl.mechanism, with a SASL_* protocol."""

    kafka_sasl_username: str | None = None
    """SASL user (PLAIN, SCRAM-*)."""

    kafka_sasl_password: SecretStr | None = None
    """SASL password (PLAIN, SCRAM-*)."""

    kafka_ssl_ca_location: Path | None = None
    """CA bundle the brokers' certificates are checked against (SSL, SASL_SSL); unset: the system's."""

    kafka_config: dict[str, str | int | float | bool] = Field(default_factory=dict, repr=False)
    """Any other librdkafka properties, as a JSON object (JOEY_KAFKA_CONFIG='{"ssl.key.location": ...}'),
    given to every Kafka client over Joey's defaults (a call's own settings, such as its group, win)."""

    tls: bool = False
    """Call the registry over TLS, checking its certificate against the system's roots."""

    tls_ca: Path | None = None
    """CA bundle (PEM) the registry's certificate is checked against; implies TLS."""

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """Redis: replica and service heartbeats, engine slot leases and the autoscaler's lease."""

    redis_prefix: str = "joey"
    """Prefix of every Redis key, so several stacks can share one Redis."""

    registry_addr: str = "127.0.0.1:50051"
    """host:port of the registry's gRPC API."""

    workspace: str = "default"
    """The workspace an SDK client starts in (a task's run gets its task's)."""

    logs_partitions: int = Field(default=8, ge=1)
    """Partitions of the joey.logs topic (created once; the embedded broker cannot add partitions)."""

    pipeline_partitions: int = Field(default=8, ge=1)
    """Partitions of each pipeline's topics; also the maximum replicas of a deployment."""

    log_level: str = "INFO"

    @field_serializer("kafka_config", when_used="json")
    def _masked(self, config: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
        # Like a SecretStr's: shown as JSON, a secret property's value is masked.
        return {key: MASK if secret_key(key) else value for key, value in config.items()}

    @model_validator(mode="after")
    def _kafka_security(self) -> Self:
        protocol = self.kafka_security_protocol or "PLAINTEXT"
        sasl = protocol.startswith("SASL_")
        if sasl and self.kafka_sasl_mechanism is None:
            raise ValueError(f"JOEY_KAFKA_SECURITY_PROTOCOL={protocol} needs JOEY_KAFKA_SASL_MECHANISM")
        if not sasl:
            given = [
                f"JOEY_KAFKA_SASL_{name.upper()}"
                for name in ("mechanism", "username", "password")
                if getattr(self, f"kafka_sasl_{name}") is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set, but JOEY_KAFKA_SECURITY_PROTOCOL is {protocol}: set it to "
                    "SASL_SSL (or SASL_PLAINTEXT)"
                )
        if self.kafka_sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            not self.kafka_sasl_username or self.kafka_sasl_password is None
        ):
            raise ValueError(
                f"JOEY_KAFKA_SASL_MECHANISM={self.kafka_sasl_mechanism} needs JOEY_KAFKA_SASL_USERNAME "
                "and JOEY_KAFKA_SASL_PASSWORD"
            )
        if self.kafka_ssl_ca_location is not None and not protocol.endswith("SSL"):
            raise ValueError(
                f"JOEY_KAFKA_SSL_CA_LOCATION set, but JOEY_KAFKA_SECURITY_PROTOCOL is {protocol}: set it to "
                "SSL or SASL_SSL"
            )
        for key in self.kafka_config:
            if key in _KAFKA_OWN_SETTINGS:
                raise ValueError(f"JOEY_KAFKA_CONFIG sets {key!r}: set {_KAFKA_OWN_SETTINGS[key]} instead")
            if key in _KAFKA_JOEY_OWNED:
                raise ValueError(
                    f"JOEY_KAFKA_CONFIG sets {key!r}: Joey sets it itself, its delivery guarantees rest on it"
                )
        _check_files(self, "tls_ca")
        return self


class DatabaseSettings(CommonSettings):
    """Mixed into the settings of the services that use Postgres (registry, logger, assayer) and `joey up`."""

    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/joey")
    """Postgres database holding registry metadata and the inference log."""


class TlsServerSettings(CommonSettings):
    """Mixed into the settings of the services that listen for calls (registry, gateway)."""

    tls_cert: Path | None = None
    """Certificate chain (PEM) this service presents; with ``tls_key``, its gRPC and REST ports speak TLS."""

    tls_key: Path | None = None
    """Private key (PEM) of ``tls_cert``."""

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if self.tls_cert is not None and self.tls_key is None:
            raise ValueError("JOEY_TLS_CERT set without JOEY_TLS_KEY: TLS needs the certificate and its key")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("JOEY_TLS_KEY set without JOEY_TLS_CERT: TLS needs the certificate and its key")
        _check_files(self, "tls_cert", "tls_key")
        return self


def _check_files(settings: BaseSettings, *names: str) -> None:
    for name in names:
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise ValueError(f"JOEY_{name.upper()}={path} is not a file")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ServiceSettings(CommonSettings):
    """What every service process has: a name of its own and a heartbeat in Redis."""

    instance_id: str = Field(default_factory=default_instance_id)
    """Name of this process in heartbeats, consumer client ids and logs (`joey up` sets one per service)."""

    heartbeat_ttl_s: float = Field(default=5.0, gt=0)
    """How long a heartbeat (and an engine's slot lease) outlives its last refresh: an instance not
    heard from for this long counts as gone."""

    metrics_host: str = "127.0.0.1"
    """Interface the Prometheus metrics endpoint (where a service has one) listens on; 0.0.0.0 for
    a scraper on another host."""
