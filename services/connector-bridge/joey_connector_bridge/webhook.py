"""An HTTP endpoint as a sink: each batch is one POST of JSON ``{"rows": [...]}`` to the connection's
URL with its headers, every row the Postgres sink's columns, ``request_id`` included so the receiver
can keep one per request id (a batch is posted again after a crash or a failed attempt).

A 2xx is a write. A 400, 413 or 422 is the receiver refusing that batch for good (these rows, as they
are): the bridge skips it, counts its rows in ``joey_bridge_rows_refused_total``, and its status keeps
saying so; there is no dead-letter topic (the results stay on the pipeline's topics for their
retention, so a new sink can take them again). Any other answer (a 5xx, a 401 or 403 of a rotated
token, a 404 of a receiver being deployed, a redirect, which is never followed) or none (refused,
reset, timed out) is the receiver being unavailable until it or the connection is mended: the bridge
retries the same batch with exponential backoff, its status ``retrying`` with the answer.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from joey_connector_bridge.connectors import (
    Bridge,
    Refused,
    ResultRow,
    Sink,
    Unavailable,
    register_sink,
)
from joey_core.connections.base import first_line
from joey_core.connections.http import NoRedirects
from joey_core.connections.sealing import redacted_url

REFUSED = frozenset({400, 413, 422})
"""Answers that say these rows will never be taken: any other is retried, since dropping rows on a
mendable answer (a token rotated, a receiver not deployed yet) loses them for good."""
BODY_SHOWN = 200
"""Characters of a refusing receiver's answer shown in the status."""


@register_sink
class HttpSink(Sink):
    type = "http"

    def __init__(self, details: Mapping[str, Any], bridge: Bridge) -> None:
        super().__init__(details, bridge)
        self._shown = redacted_url(str(details["url"]))
        self._opener = urllib.request.build_opener(NoRedirects())

    def write(self, rows: Sequence[ResultRow]) -> None:
        body = json.dumps({"rows": [row.columns() for row in rows]}).encode()
        headers: dict[str, Any] = dict(self.details.get("headers") or {})
        headers["Content-Type"] = "application/json"
        # The scheme was checked on create: http or https, never file:.
        request = urllib.request.Request(  # noqa: S310
            str(self.details["url"]), data=body, headers=headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.bridge.settings.delivery_timeout_s) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            said = first_line(Exception(exc.read(BODY_SHOWN).decode("utf-8", errors="replace")), BODY_SHOWN)
            why = f"{self._shown} answered {exc.code} {exc.reason}: {said}"
            if exc.code in REFUSED:
                raise Refused(why, len(rows)) from None
            raise Unavailable(why) from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"cannot POST to {self._shown}: {first_line(exc)}") from None
