"""Page tokens of QueryLogs: base64url of a small JSON holding where the last page ended.

A token carries the (time, id) of the last row returned, the total counted on the first page
(so later pages skip the count) and a fingerprint of the filter, so a token is only accepted
by the query that issued it. Tokens are not signed: a forged one can only move the cursor
inside a filter the caller is already allowed to read, so every decoded field is validated
and nothing else is trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from joey_registry.domain import LogCursor, LogQuery
from joey_registry.errors import InvalidArgument

_VERSION = 1
_MAX_TOKEN_LENGTH = 512
_MAX_INT64 = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Microseconds since the epoch of the first and last instants a datetime can hold.
_MIN_MICROS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
_MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


def _fingerprint(query: LogQuery) -> str:
    # The page size is left out: a caller may change it between pages.
    fields = [
        query.workspace,
        query.pipeline,
        query.start.isoformat() if query.start else None,
        query.end.isoformat() if query.end else None,
        query.validity.value,
        "asc" if query.chronological else "desc",
        query.anomalies_only,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def encode(query: LogQuery, cursor: LogCursor, total: int) -> str:
    body = {
        "v": _VERSION,
        "f": _fingerprint(query),
        "t": (cursor.time - _EPOCH) // timedelta(microseconds=1),
        "i": cursor.id,
        "n": total,
    }
    data = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode(query: LogQuery, token: str) -> tuple[LogCursor, int]:
    """The cursor and first-page total of a token issued for ``query``."""
    body = _body(token)
    if body["f"] != _fingerprint(query):
        raise InvalidArgument(
            "page token does not belong to this query: workspace, pipeline, start, end, validity "
            "or anomalies_only differ"
        )
    return LogCursor(_EPOCH + timedelta(microseconds=body["t"]), body["i"]), body["n"]


def _body(token: str) -> dict[str, Any]:
    if len(token) > _MAX_TOKEN_LENGTH:
        raise InvalidArgument(f"invalid page token: longer than {_MAX_TOKEN_LENGTH} characters")
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(data)
    except (binascii.Error, ValueError):
        raise InvalidArgument("invalid page token: not a token returned by QueryLogs") from None
    if (
        not isinstance(body, dict)
        or body.keys() != {"v", "f", "t", "i", "n"}
        or not _is_int(body["v"], _VERSION, _VERSION)
        or not isinstance(body["f"], str)
        or not _is_int(body["t"], _MIN_MICROS, _MAX_MICROS)
        or not _is_int(body["i"], 1, _MAX_INT64)
        or not _is_int(body["n"], 0, _MAX_INT64)
    ):
        raise InvalidArgument("invalid page token: its content is damaged")
    return body


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high
