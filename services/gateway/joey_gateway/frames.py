"""Bodies of the records endpoint (``POST /pipelines/<workspace>/<pipeline>/infer``), Wallaroo's formats:
pandas records JSON (what ``DataFrame.to_json(orient="records")`` writes: a list of objects, one per input
record) or Apache Arrow IPC, file or stream (a table, one row per record), chosen by Content-Type. The answer
is the SDK's ``pipeline.infer`` result rows, in the format of the request.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from joey_core.inputs import InputError, RecordInput, to_records
from joey_core.records import dumps
from joey_gateway.errors import GatewayError, Status
from joey_gateway.tensors import Limits


class Format(enum.Enum):
    """A body format, by its media type."""

    JSON = "application/json"
    ARROW_FILE = "application/vnd.apache.arrow.file"
    ARROW_STREAM = "application/vnd.apache.arrow.stream"


_ACCEPTED = ", ".join(f.value for f in Format)


def _bad(message: str) -> GatewayError:
    return GatewayError(Status.INVALID_ARGUMENT, message)


def body_format(content_type: str | None) -> Format:
    """The format a Content-Type names; 415 for any other (JSON only as pandas records)."""
    media, *parameters = (content_type or "").split(";")
    try:
        found = Format(media.strip().lower())
    except ValueError:
        raise GatewayError(
            Status.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r} is not served here; send one of {_ACCEPTED}",
        ) from None
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        value = value.strip().strip('"')
        if found is Format.JSON and name.strip().lower() == "format" and value != "pandas-records":
            raise GatewayError(
                Status.UNSUPPORTED_MEDIA_TYPE,
                f"JSON format {value!r} is not served here: send pandas records (format=pandas-records, "
                'the default), a list of objects as DataFrame.to_json(orient="records") writes',
            )
    return found


def decode_records(body: bytes, format: Format, limits: Limits) -> pa.Table | list[dict[str, Any]]:
    """The records (JSON) or table (Arrow) of a body; 400 naming the problem, 413 past ``limits.max_rows``."""
    if format is Format.JSON:
        return _json_records(body, limits)
    try:
        source = pa.BufferReader(body)
        reader = pa.ipc.open_file(source) if format is Format.ARROW_FILE else pa.ipc.open_stream(source)
        table = reader.read_all()
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid, and the OSError of a truncated body
        raise _bad(f"the body is not an Arrow IPC {format.name.split('_')[1].lower()}: {exc}") from None
    _check_count(table.num_rows, limits)
    return table


def _json_records(body: bytes, limits: Limits) -> list[dict[str, Any]]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad("request body is not valid JSON: nested too deeply") from None
    if not isinstance(document, list):
        raise _bad(
            f"request body must be a JSON list of records (objects), one per input record, as "
            f'DataFrame.to_json(orient="records") writes; got a JSON {_json_type(document)}'
        )
    _check_count(len(document), limits)
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            raise _bad(f"record {index} of the body is a JSON {_json_type(record)}, not an object")
    return document


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _check_count(rows: int, limits: Limits) -> None:
    if rows == 0:
        raise _bad("the body holds no records")
    if rows > limits.max_rows:
        raise GatewayError(
            Status.TOO_LARGE, f"the body holds {rows} records; a request may hold at most {limits.max_rows}"
        )


def input_records(
    pipeline: str, data: pa.Table | list[dict[str, Any]], inputs: Sequence[RecordInput]
) -> list[dict[str, Any]]:
    """The records to produce, shaped as the SDK's ``pipeline.infer`` shapes a DataFrame or an Arrow table
    (:func:`joey_core.inputs.to_records`): records naming none of the pipeline's ``inputs`` are columns,
    packed into its one vector input when they fit it, refused whole (400, saying how to shape them)
    otherwise. Records naming an input are produced as they are."""
    if isinstance(data, list):
        if not inputs or any(i.field in record for record in data for i in inputs):
            return data
        data = pd.DataFrame(data)
    try:
        return to_records(data, lambda: inputs, pipeline)
    except InputError as exc:
        raise _bad(str(exc)) from None


def encode_rows(frame: pd.DataFrame, format: Format) -> bytes:
    """Result rows in ``format``: JSON records (times in ISO 8601, missing values null) or Arrow IPC."""
    if format is Format.JSON:
        cells = frame.astype(object).where(frame.notna(), None)
        for column in cells.columns:
            if pd.api.types.is_datetime64_any_dtype(frame[column].dtype):
                cells[column] = [None if t is None else t.isoformat() for t in cells[column]]
        return dumps(cells.to_dict(orient="records"))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_file if format is Format.ARROW_FILE else pa.ipc.new_stream
    with writer(sink, table.schema) as out:
        out.write_table(table)
    return bytes(sink.getvalue())
