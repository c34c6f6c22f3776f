"""Keeping secrets out of logs and error messages.

Secret settings are ``SecretStr`` (their repr is ``**********``); what still needs care is text built from
their values: a URL put in an error, a client library's message quoting its connection string.
:func:`url` hides a URL's password, :func:`scrub` every known secret value in a text, and
:class:`RedactingFormatter` (installed by :func:`joey_core.lifecycle.configure_logging`) applies
:func:`scrub` to every log line, traceback included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr

MASK = "***"

# Names of librdkafka properties (in JOEY_KAFKA_CONFIG) whose values are secrets.
_SECRET_KEY = re.compile(r"password|secret|token|credential|key\.pem|oauthbearer\.config", re.IGNORECASE)


def secret_key(name: str) -> bool:
    """Whether a librdkafka property (of JOEY_KAFKA_CONFIG) holds a secret, by its name."""
    return _SECRET_KEY.search(name) is not None


def url(text: str) -> str:
    """``text`` with the password of the URL it is replaced by ``***``."""
    try:
        password = urlsplit(text).password
    except ValueError:  # not a URL (an unparsable port): nothing to find in it
        return text
    return text.replace(f":{password}@", f":{MASK}@", 1) if password else text


def secrets_of(settings: BaseModel) -> list[str]:
    """The secret values ``settings`` holds: every ``SecretStr`` (of a URL, its password), and the
    values of secret-named JOEY_KAFKA_CONFIG properties."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            found.append(_secret_part(value.get_secret_value()))
        elif name == "kafka_config":
            found += [str(v) for k, v in value.items() if secret_key(k)]
    # Longest first: a secret containing another is replaced whole.
    return sorted({s for s in found if s}, key=len, reverse=True)


def _secret_part(value: str) -> str:
    """Of a URL, its password (the rest, such as a Redis host, is what an error must name); of anything
    else, all of it."""
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if parts.scheme and parts.netloc:
        return password or ""
    return value


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line, exception and stack included, has the given secrets scrubbed."""

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self._secrets = sorted(set(secrets), key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record), self._secrets)
