"""A protobuf ``Struct`` as plain Python: Struct has only doubles, so a whole number (``roll_rows``, a
port) comes back as ``100.0``; here it comes back as it was sent, ``100``."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct


def plain(struct: Struct) -> dict[str, Any]:
    found: dict[str, Any] = _whole(json_format.MessageToDict(struct))
    return found


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value
