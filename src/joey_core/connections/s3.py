"""``s3``: a bucket and prefix of any S3-compatible store, through pyarrow's S3 filesystem (the one
that will read and write Parquet there)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from joey_core.connections.base import (
    ConnectionType,
    InvalidDetails,
    Probe,
    Report,
    Rolling,
    first_line,
    register,
)


class S3Details(Rolling):
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    prefix: str = Field(default="", max_length=1024)
    endpoint: str | None = Field(default=None, max_length=2048)
    """http(s)://host:port of an S3-compatible server; unset: AWS."""
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,32}$")
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None


@register
class S3(ConnectionType):
    name = "s3"
    details = S3Details
    secret_fields = frozenset({"secret_access_key", "session_token"})
    url_fields = frozenset({"endpoint"})

    def check(self, details: Any) -> None:
        assert isinstance(details, S3Details)
        if details.endpoint is not None:
            parts = urlsplit(details.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidDetails("endpoint", "must be an http:// or https:// URL")
        if bool(details.access_key_id) != bool(details.secret_access_key):
            missing = "secret_access_key" if details.access_key_id else "access_key_id"
            raise InvalidDetails(missing, "give both access_key_id and secret_access_key, or neither")

    def probe(self, details: Mapping[str, Any]) -> Probe:
        if details.get("endpoint"):
            return Probe(hosts=(urlsplit(details["endpoint"]).hostname or "",))
        region = details.get("region") or "us-east-1"
        return Probe(hosts=(f"s3.{region}.amazonaws.com",))

    def test(self, details: Mapping[str, Any], timeout_s: float) -> Report:
        from pyarrow import fs  # only where a test runs: pyarrow's S3 starts the AWS SDK

        bucket, prefix = details["bucket"], details.get("prefix", "").strip("/")
        try:
            store = filesystem(details, timeout_s)
            info = store.get_file_info(bucket)
            if info.type != fs.FileType.Directory:
                return Report(False, f"bucket {bucket!r} does not exist", {"bucket": bucket, "exists": False})
            selector = fs.FileSelector(f"{bucket}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True)
            objects = sum(1 for f in store.get_file_info(selector) if f.type == fs.FileType.File)
        except (OSError, ValueError) as exc:  # pyarrow's errors: OSError, ArrowInvalid (a ValueError)
            return Report(False, f"cannot use bucket {bucket!r}: {first_line(exc)}", {"bucket": bucket})
        where = f"under {prefix!r}" if prefix else "in it"
        return Report(
            True,
            f"bucket {bucket!r} is reachable: {objects} objects {where}",
            {"bucket": bucket, "exists": True, "objects": objects},
        )


def filesystem(details: Mapping[str, Any], timeout_s: float) -> Any:
    """A pyarrow S3FileSystem of the connection: its credentials only, or anonymous, never the host's
    (environment, ~/.aws, instance metadata)."""
    from pyarrow import fs

    options: dict[str, Any] = {
        "connect_timeout": timeout_s,
        "request_timeout": timeout_s,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1),
        "region": details.get("region") or "us-east-1",
    }
    if details.get("endpoint"):
        parts = urlsplit(details["endpoint"])
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme
    if details.get("access_key_id"):
        options["access_key"] = details["access_key_id"]
        options["secret_key"] = details["secret_access_key"]
        if details.get("session_token"):
            options["session_token"] = details["session_token"]
    else:
        options["anonymous"] = True
    return fs.S3FileSystem(**options)
