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
from flatbuffers import encode, number_types
from flatbuffers.table import Table

from joey_core.inputs import InputError, RecordInput, to_records
from joey_core.records import dumps
from joey_core.results import Row, rows_to_frame
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


def json_document(body: bytes) -> Any:
    """A JSON request body, parsed; 400 naming the problem when it is not JSON. Every JSON body of the
    gateway is read here (the OIP's and the records endpoint's)."""
    try:
        return json.loads(body)
    # ValueError: a JSONDecodeError, and also an integer of more than sys.get_int_max_str_digits() digits.
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad("request body is not valid JSON: nested too deeply") from None


def decode_records(
    body: bytes, format: Format, limits: Limits, max_bytes: int
) -> pa.Table | list[dict[str, Any]]:
    """The records (JSON) or table (Arrow) of a body; 400 naming the problem, 413 past ``limits`` (rows,
    values) or, for Arrow, when its columns would take more than ``max_bytes`` in memory."""
    if format is Format.JSON:
        return _json_records(body, limits)
    return _arrow_table(body, format, limits, max_bytes)


_FILE_MAGIC = b"ARROW1\0\0"

# Arrow types whose values a small body can repeat at will (a dictionary, run ends, views into shared data):
# as records they would take many times the body's size.
_REPEATING = {
    pa.types.is_dictionary: "dictionary-encoded",
    pa.types.is_run_end_encoded: "run-end encoded",
    pa.types.is_list_view: "list-view",
    pa.types.is_large_list_view: "list-view",
    pa.types.is_string_view: "string-view",
    pa.types.is_binary_view: "binary-view",
}


def _arrow_table(body: bytes, format: Format, limits: Limits, max_bytes: int) -> pa.Table:
    """The table of an Arrow IPC body, read a message at a time: every record batch is counted (its rows
    from its header, before it is decoded), refused when compressed (decompressing is where a small body
    turns into a huge table) and checked against the limits before the next is read. A file is read as the
    stream it begins with: the batches its footer lists, for a file any Arrow writer made."""
    kind = format.name.split("_")[1].lower()
    start = 0
    if format is Format.ARROW_FILE:
        if not body.startswith(_FILE_MAGIC):
            raise _bad(f"the body is not an Arrow IPC file: it does not begin with {_FILE_MAGIC[:6]!r}")
        start = len(_FILE_MAGIC)
    batches: list[pa.RecordBatch] = []
    rows = elements = size = 0
    try:
        messages = pa.ipc.MessageReader.open_stream(pa.py_buffer(body)[start:])
        schema = pa.ipc.read_schema(messages.read_next_message())
        _check_types(schema)
        for message in messages:
            if message.type != "record batch":
                raise _bad(f"the body holds an Arrow {message.type} message where record batches belong")
            length, compressed = _batch_header(message.metadata.to_pybytes())
            if compressed:
                raise GatewayError(
                    Status.UNSUPPORTED_MEDIA_TYPE,
                    "the body's Arrow record batches are compressed (LZ4 or ZSTD): send them uncompressed, "
                    "as pandas and pyarrow write by default",
                )
            rows += length
            _check_count(rows, limits, empty=False)
            batch = pa.ipc.read_record_batch(message, schema)
            elements += sum(_elements(column) for column in batch.columns)
            size += batch.nbytes
            _check_size(elements, size, limits, max_bytes)
            batches.append(batch)
    except (pa.ArrowException, OSError, StopIteration) as exc:  # ArrowInvalid; a truncated body
        reason = str(exc) or "it ends before its schema"
        raise _bad(f"the body is not an Arrow IPC {kind}: {reason}") from None
    _check_count(rows, limits)
    return pa.Table.from_batches(batches, schema)


def _check_types(schema: pa.Schema) -> None:
    def check(name: str, type: pa.DataType) -> None:
        for test, what in _REPEATING.items():
            if test(type):
                raise GatewayError(
                    Status.UNSUPPORTED_MEDIA_TYPE,
                    f"column {name!r} is {what} ({type}): send its values plain (decoded, e.g. with "
                    "pyarrow.compute.cast or DataFrame.astype)",
                )
        for index in range(type.num_fields):
            check(name, type.field(index).type)

    for field in schema:
        check(field.name, field.type)


def _batch_header(metadata: bytes) -> tuple[int, bool]:
    """The rows of a record batch message and whether its body is compressed, read from its metadata (the
    ``Message`` and ``RecordBatch`` tables of Arrow's format/Message.fbs) without decoding the body."""
    buffer = bytearray(metadata)
    message = Table(buffer, encode.Get(number_types.UOffsetTFlags.packer_type, buffer, 0))
    batch = Table(buffer, 0)
    header = message.Offset(8)  # Message.header: the RecordBatch of a record batch message
    if not header:
        return 0, False
    message.Union(batch, header)
    length = batch.Offset(4)  # RecordBatch.length
    rows = batch.Get(number_types.Int64Flags, length + batch.Pos) if length else 0
    return rows, bool(batch.Offset(10))  # RecordBatch.compression: absent unless compressed


def _elements(array: pa.Array) -> int:
    """The leaf values of a column, what its records hold (a list of 4 floats is 4 values)."""
    if isinstance(array, pa.StructArray):
        return sum(_elements(child) for child in array.flatten())
    if isinstance(array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):
        return _elements(array.flatten())
    return len(array)


def _check_size(elements: int, size: int, limits: Limits, max_bytes: int) -> None:
    if elements > limits.max_elements:
        raise GatewayError(
            Status.TOO_LARGE,
            f"the body holds at least {elements} values; a request may hold at most {limits.max_elements}",
        )
    if size > max_bytes:
        raise GatewayError(
            Status.TOO_LARGE,
            f"the body's columns take at least {size} bytes in memory; a request may take at most "
            f"{max_bytes}",
        )


def _json_records(body: bytes, limits: Limits) -> list[dict[str, Any]]:
    document = json_document(body)
    if not isinstance(document, list):
        raise _bad(
            f"request body must be a JSON list of records (objects), one per input record, as "
            f'DataFrame.to_json(orient="records") writes; got a JSON {_json_type(document)}'
        )
    _check_count(len(document), limits)
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            raise _bad(f"record {index} of the body is a JSON {_json_type(record)}, not an object")
    _check_size(_json_elements(document), 0, limits, 0)
    return document


def _json_elements(value: Any) -> int:
    """The leaf values of a JSON document, what its records hold."""
    if isinstance(value, dict):
        return sum(_json_elements(item) for item in value.values())
    if isinstance(value, list):
        return sum(_json_elements(item) for item in value)
    return 1


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _check_count(rows: int, limits: Limits, empty: bool = True) -> None:
    """Refuse more rows than ``limits`` allow and, with ``empty``, none."""
    if empty and rows == 0:
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


def encode_rows(rows: list[Row], format: Format) -> bytes:
    """Result rows in ``format``: JSON records (every row with every column, times in ISO 8601, missing
    values null), built from the rows as they are; or Arrow IPC of the SDK's frame of them."""
    if format is Format.JSON:
        columns = list(dict.fromkeys(name for row in rows for name in row))  # the frame's column order
        return dumps([{name: _json_cell(row.get(name)) for name in columns} for row in rows])
    table = pa.Table.from_pandas(rows_to_frame(rows), preserve_index=False)
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_file if format is Format.ARROW_FILE else pa.ipc.new_stream
    with writer(sink, table.schema) as out:
        out.write_table(table)
    return bytes(sink.getvalue())


def _json_cell(value: Any) -> Any:
    return value.isoformat() if isinstance(value, pd.Timestamp) else value
