"""Replies as result rows: the columns every synchronous caller answers with, the SDK's
``pipeline.infer`` and the gateway's records endpoint alike, built by one function so they cannot drift.

A row is ``time``, ``request_id``, ``in.<field>``, ``out.<output>``, ``shadow.<model>.<output>`` and
``shadow_errors.<model>`` (pipelines with a shadow step), ``anomaly.*`` (pipelines with validations),
``check_failures``, ``error`` (None unless the record failed) and ``metadata.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from joey_core.lazy import LazyModule
from joey_core.replies import Reply

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")

Row = dict[str, Any]


def flatten(prefix: str, values: dict[str, Any] | None) -> Row:
    return {f"{prefix}.{k}": v for k, v in (values or {}).items()}


def flatten_shadow(shadow: dict[str, dict[str, Any]] | None) -> Row:
    """Challenger outputs ({model: {output: value}}) as ``shadow.<model>.<output>`` columns."""
    row: Row = {}
    for model, outputs in (shadow or {}).items():
        row |= flatten(f"shadow.{model}", outputs)
    return row


def reply_rows(replies: Sequence[Reply]) -> list[Row]:
    """One result row per reply; a row holds only the columns its reply has (a failed one no ``out.*``)."""
    rows = []
    for reply in replies:
        body = reply.body
        meta = body.get("metadata", {})
        row: dict[str, Any] = {"time": pd.Timestamp(body["time"]), "request_id": reply.request_id}
        row |= flatten("in", body.get("in") if reply.ok else body.get("input"))
        row |= flatten("out", body.get("out"))
        # Present only when the pipeline has a shadow step: challenger outputs, and their failures.
        row |= flatten_shadow(body.get("shadow"))
        row |= flatten("shadow_errors", body.get("shadow_errors"))
        # Present only when the pipeline has validations: anomaly.count and anomaly.<check>.
        row |= flatten("anomaly", body.get("anomaly"))
        row["check_failures"] = body.get("check_failures", [])
        row["error"] = None if reply.ok else body.get("error")
        row |= flatten(
            "metadata",
            {k: meta.get(k) for k in ("pipeline_version", "models", "elapsed_ns", "partition", "offset")},
        )
        rows.append(row)
    return rows


def rows_to_frame(rows: Sequence[Row]) -> pd.DataFrame:
    """Result rows as the SDK's frame: every row's columns, in the order they first appear, gaps missing."""
    # Nullable dtypes keep integer outputs integers when a failed row leaves a gap.
    return pd.DataFrame(rows).convert_dtypes()


def replies_to_frame(replies: Sequence[Reply]) -> pd.DataFrame:
    return rows_to_frame(reply_rows(replies))
