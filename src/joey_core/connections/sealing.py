"""Secrets of connection details: which values are secret, their redacted form, and sealing them
with Fernet (``cryptography``) under the registry's JOEY_SECRET_KEY.

A connection is stored as its redacted details (readable, listed) plus one Fernet token holding the
secret values by path; :meth:`Sealer.unseal` puts them back. Several keys may be given, the first
sealing and every one opening (MultiFernet), so a key can be rotated: put the new key first, keep the
old one until :meth:`Sealer.rotate` re-sealed every row.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from joey_core import redaction
from joey_core.connections.base import ConnectionType, SecretPath, secret_name

MASK = redaction.MASK


class SecretKeyError(ValueError):
    pass


def redacted_url(value: str) -> str:
    """A URL without its password, nor the values of query parameters named like secrets (``?token=``)."""
    text = redaction.url(value)
    try:
        query = urlsplit(text).query
    except ValueError:
        return text
    for name, secret in parse_qsl(query, keep_blank_values=True):
        if secret and secret_name(name):
            text = re.sub(rf"([?&]{re.escape(name)}=)[^&#]*", rf"\g<1>{MASK}", text)
    return text


def secret_paths(kind: ConnectionType, details: Mapping[str, Any]) -> list[SecretPath]:
    """The paths of the secret values in ``details`` (validated ones)."""
    paths: list[SecretPath] = [(f,) for f in sorted(kind.secret_fields) if details.get(f)]
    for f in sorted(kind.url_fields):
        value = details.get(f)
        if isinstance(value, str) and redacted_url(value) != value:
            paths.append((f,))
    for f in sorted(kind.named_fields):
        entries = details.get(f) or {}
        paths += [(f, name) for name in sorted(entries) if secret_name(name)]
    return paths


def _get(details: Mapping[str, Any], path: SecretPath) -> Any:
    value: Any = details
    for part in path:
        value = value[part]
    return value


def _set(details: dict[str, Any], path: SecretPath, value: Any) -> None:
    target = details
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def secret_values(kind: ConnectionType, details: Mapping[str, Any]) -> list[str]:
    """The secret values of ``details`` as text to scrub from messages: each whole, and of a URL its
    password (a client library may quote it decoded or alone)."""
    found: list[str] = []
    for path in secret_paths(kind, details):
        value = str(_get(details, path))
        found.append(value)
        if len(path) == 1 and path[0] in kind.url_fields:
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            found += [password, unquote(password)] if password else []
    return sorted({s for s in found if s}, key=len, reverse=True)


def redacted(kind: ConnectionType, details: Mapping[str, Any]) -> dict[str, Any]:
    """``details`` with each secret value replaced by ``***`` (a URL keeps all but its password)."""
    out = copy.deepcopy(dict(details))
    for path in secret_paths(kind, details):
        value = _get(details, path)
        is_url = len(path) == 1 and path[0] in kind.url_fields
        _set(out, path, redacted_url(value) if is_url else MASK)
    return out


class Sealer:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise SecretKeyError("no key: set JOEY_SECRET_KEY")
        try:
            self._fernet = MultiFernet([Fernet(k.strip().encode()) for k in keys])
        except ValueError:
            raise SecretKeyError(
                "JOEY_SECRET_KEY must be Fernet keys (32 url-safe base64-encoded bytes each, "
                "comma-separated): "
                'make one with python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"'
            ) from None

    def seal(self, kind: ConnectionType, details: Mapping[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        """The redacted details and a token of the secret values (None when there are none)."""
        paths = secret_paths(kind, details)
        public = redacted(kind, details)
        if not paths:
            return public, None
        values = [[list(p), _get(details, p)] for p in paths]
        return public, self._fernet.encrypt(json.dumps(values).encode())

    def unseal(self, public: Mapping[str, Any], token: bytes | None) -> dict[str, Any]:
        """The full details from their redacted form and their token."""
        details = copy.deepcopy(dict(public))
        if token is None:
            return details
        try:
            values = json.loads(self._fernet.decrypt(bytes(token)))
        except InvalidToken:
            raise SecretKeyError(
                "the connection's secrets were sealed with a key JOEY_SECRET_KEY no longer holds"
            ) from None
        for path, value in values:
            _set(details, tuple(path), value)
        return details

    def rotate(self, token: bytes) -> bytes:
        """``token`` sealed again under the first key."""
        return self._fernet.rotate(bytes(token))
