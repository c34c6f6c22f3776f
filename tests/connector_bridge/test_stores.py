"""Each store's source and sink against the real store, without Kafka: files in tmp_path, moto's S3
server, an HTTP server of the test's. What the end-to-end test cannot cheaply show: the order files are
read in, files being written left alone, a crashed file sink's leftovers rewritten under the same names
(no row in two files), and which HTTP answers are retried."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from joey_connector_bridge.connectors import Bridge, Refused, ResultRow, Unavailable
from joey_connector_bridge.files import FilesSink, FilesSource
from joey_connector_bridge.filestores import FileSink, FileSource, parse_rows
from joey_connector_bridge.s3 import S3Sink, S3Source
from joey_connector_bridge.settings import BridgeSettings
from joey_connector_bridge.webhook import HttpSink
from joey_core.bridges import BridgeSpec
from tests.externals import S3Server, s3_server

BRIDGE = Bridge(
    BridgeSpec(7, "ws", "feed", "source", "p", "c", "inputs"),
    BridgeSettings(delivery_timeout_s=5, poll_interval_s=0.1),
)
TOPIC = "joey.ws.p.outputs"


LIFE = 1_767_225_600_000
"""When the topic's records were written (ms), from its first offset on: one life of it."""


def result(
    offset: int, partition: int = 0, label: int = 1, life: int = LIFE, source: str = "feed"
) -> ResultRow:
    return ResultRow(
        f"{source}/{offset}",
        str(offset),
        "2026-01-01T00:00:00+00:00",
        {"label": label},
        None,
        1,
        TOPIC,
        partition,
        offset,
        life + offset,
    )


def read_all(source: FileSource, limit: int) -> list[tuple[str, Any, dict[str, Any]]]:
    """Every record, ``limit`` at a time, as the runner reads them: each batch after the last's position."""
    found, after = [], None
    while batch := source.read(after, limit):
        found += [(r.key, r.position, json.loads(r.value)) for r in batch]
        after = batch[-1].position
    return found


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


def s3_details(s3: S3Server, prefix: str, **more: Any) -> dict[str, Any]:
    return {
        "bucket": s3.bucket,
        "prefix": prefix,
        "endpoint": s3.endpoint,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
    } | more


def test_a_files_source_reads_every_format_in_name_order_and_leaves_files_being_written(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.csv").write_text('id,features\n3,"[1.0, 2.0]"\n4,"[3.0, 4.0]"\n')
    (tmp_path / "a.jsonl").write_text('{"id": 1, "features": [0.5]}\n{"id": 2, "features": [0.25]}\n')
    pq.write_table(pa.table({"id": [5], "features": [[9.0, 8.0]]}), tmp_path / "c.parquet")
    (tmp_path / ".d.jsonl.tmp").write_text('{"id": 99}\n')  # still being written
    (tmp_path / "e.jsonl.tmp").write_text('{"id": 98}\n')
    (tmp_path / "notes.txt").write_text("not data\n")
    source = FilesSource({"path": str(tmp_path)}, BRIDGE)
    assert source.lag(None) == 5
    found = read_all(source, limit=2)
    assert [key for key, _, _ in found] == ["a.jsonl/0", "a.jsonl/1", "b.csv/0", "b.csv/1", "c.parquet/0"]
    assert [row for _, _, row in found] == [
        {"id": 1, "features": [0.5]},
        {"id": 2, "features": [0.25]},
        {"id": 3, "features": [1.0, 2.0]},  # a CSV cell holding a JSON array is a tensor
        {"id": 4, "features": [3.0, 4.0]},
        {"id": 5, "features": [9.0, 8.0]},
    ]
    last = found[-1][1]
    assert last == ["c.parquet", 0] and source.lag(last) == 0
    # A new file is read after the position; one named before it (or the ones being written) never.
    (tmp_path / "0-late.jsonl").write_text('{"id": 0}\n')
    (tmp_path / "d.jsonl").write_text('{"id": 6}\n')
    assert [r.key for r in source.read(last, 10)] == ["d.jsonl/0"]
    assert source.lag(found[1][1]) == 4, "b.csv's two rows, c.parquet's and d.jsonl's"
    only = FilesSource({"path": str(tmp_path), "pattern": "[bd].*"}, BRIDGE)
    assert [key for key, _, _ in read_all(only, limit=10)] == ["b.csv/0", "b.csv/1", "d.jsonl/0"]


def test_a_file_that_is_not_its_format_stops_the_source_saying_which(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_text("not parquet")
    with pytest.raises(Unavailable, match=r"a\.parquet as parquet"):
        FilesSource({"path": str(tmp_path)}, BRIDGE).read(None, 10)


def test_a_files_sink_rolls_by_rows_and_commits_only_what_is_written(tmp_path: Path) -> None:
    sink = FilesSink({"path": str(tmp_path), "roll_rows": 3, "roll_seconds": 3600}, BRIDGE)
    sink.write([result(o) for o in range(0, 7)] + [result(40, partition=1)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        f"{TOPIC}-0-00000000000000000000-00000000000000000002-{LIFE}.parquet",
        f"{TOPIC}-0-00000000000000000003-00000000000000000005-{LIFE + 3}.parquet",
    ]
    assert sink.held() == {(TOPIC, 0): 6, (TOPIC, 1): 40}
    table = pq.read_table(tmp_path / names[0]).to_pylist()
    assert [r["request_id"] for r in table] == ["feed/0", "feed/1", "feed/2"]
    assert json.loads(table[0]["outputs"]) == {"label": 1} and table[0]["pipeline_version"] == 1
    # The same batch again (a retry after an Unavailable) adds nothing; the next rows fill the file.
    sink.write([result(o) for o in range(0, 7)])
    sink.write([result(7), result(8)])
    assert len(list(tmp_path.iterdir())) == 3 and sink.held() == {(TOPIC, 1): 40}


def test_a_replay_after_a_crash_rewrites_the_same_files(tmp_path: Path) -> None:
    """A sink that wrote files and died before committing them; its successor, replaying from the
    committed offset, rolls on age this time: it ends its files where the leftovers end. The
    connection's pattern (a source's, the connection shared) hides none of the sink's own files."""
    shared = {"path": str(tmp_path), "pattern": "*.csv"}
    crashed = FilesSink(shared | {"roll_rows": 4}, BRIDGE)
    crashed.write([result(o) for o in range(10, 19)])  # files 10-13 and 14-17 written, 18 held
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2
    successor = FilesSink(shared | {"roll_rows": 4, "roll_seconds": 1e-9}, BRIDGE)
    successor.write([result(o) for o in range(10, 12)])
    successor.tick()  # aged, but not at the leftover's end yet: held
    assert successor.held() == {(TOPIC, 0): 10}
    successor.write([result(o) for o in range(12, 20)])
    successor.tick()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:2] == leftovers and len(names) == 3, names
    request_ids = [r["request_id"] for n in names for r in pq.read_table(tmp_path / n).to_pylist()]
    assert sorted(request_ids) == sorted(f"feed/{o}" for o in range(10, 20)), "every row in one file"
    assert successor.held() == {}


def sink_rows(where: list[bytes]) -> list[str]:
    return sorted(r["request_id"] for data in where for r in parse_rows(data, "parquet"))


def test_a_new_life_of_the_topic_never_overwrites_the_results_of_the_last(
    s3: S3Server, tmp_path: Path
) -> None:
    """The topic deleted and created again (or the embedded broker restarted) numbers its offsets
    from 0 again: its files are new ones beside the last life's, and a file already there under a
    name the sink wants, holding other rows, stops the sink rather than being replaced."""
    client = s3.client()
    stores: list[tuple[dict[str, Any], type[FileSink], Callable[[], list[bytes]]]] = [
        ({"path": str(tmp_path)}, FilesSink, lambda: [p.read_bytes() for p in tmp_path.glob("*.parquet")]),
        (
            s3_details(s3, "lives"),
            S3Sink,
            lambda: [
                client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
                for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="lives/").get("Contents", [])
            ],
        ),
    ]
    for details, kind, stored in stores:
        details |= {"roll_rows": 5}
        kind(details, BRIDGE).write([result(o, source="monday") for o in range(10)])
        kind(details, BRIDGE).write([result(o, source="tuesday", life=LIFE + 86_400_000) for o in range(10)])
        assert sink_rows(stored()) == sorted(f"{day}/{o}" for day in ("monday", "tuesday") for o in range(10))
        # The same name, other rows (a broker keeping no timestamps, or a clock set back): kept as it is.
        wednesday = kind(details, BRIDGE)
        with pytest.raises(
            Unavailable, match=r"there already with other results .*monday/0.*not overwritten"
        ):
            wednesday.write([result(o, source="wednesday") for o in range(10)])
        assert wednesday.held() == {(TOPIC, 0): 0}, "nothing committed past the rows not written"
        assert len(stored()) == 4 and "wednesday/0" not in sink_rows(stored())


def test_an_s3_source_and_sink(s3: S3Server, tmp_path: Path) -> None:
    """The same rules over moto's S3: objects under the prefix read in key order, results written as
    objects there, nothing written by halves."""
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="feed/2.jsonl", Body=b'{"x": [2]}\n')
    client.put_object(Bucket=s3.bucket, Key="feed/1.csv", Body=b"x\n1\n")
    client.put_object(Bucket=s3.bucket, Key="feed/_tmp/3.jsonl", Body=b'{"x": 3}\n')
    source = S3Source(s3_details(s3, "feed/"), BRIDGE)
    assert [(k, row) for k, _, row in read_all(source, 1)] == [
        ("1.csv/0", {"x": 1}),
        ("2.jsonl/0", {"x": [2]}),
    ]

    sink = S3Sink(s3_details(s3, "results", roll_rows=2), BRIDGE)
    sink.write([result(o) for o in range(3)])
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="results/")["Contents"]
    assert [o["Key"] for o in listed] == [
        f"results/{TOPIC}-0-00000000000000000000-00000000000000000001-{LIFE}.parquet"
    ]
    body = client.get_object(Bucket=s3.bucket, Key=listed[0]["Key"])["Body"].read()
    assert [r["request_id"] for r in parse_rows(body, "parquet")] == ["feed/0", "feed/1"]
    assert sink.held() == {(TOPIC, 0): 2}

    gone = S3Source(s3_details(s3, "feed/", endpoint="http://127.0.0.1:9"), BRIDGE)
    with pytest.raises(Unavailable, match="cannot list") as caught:
        gone.read(None, 10)
    assert s3.secret_access_key not in str(caught.value)


class Receiver(http.server.ThreadingHTTPServer):
    """Answers the statuses of ``answers`` to the first POSTs, one each, 400 to a batch holding request
    id ``feed/400``, 200 to the rest, and keeps every body it was sent with its headers."""

    answers: list[int]
    received: list[tuple[dict[str, str], dict[str, Any]]]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append((dict(self.headers), body))
        if self.server.answers:
            status = self.server.answers.pop(0)
        elif any(r["request_id"] == "feed/400" for r in body["rows"]):
            status = 400
        else:
            status = 200
        answer = b"bad row feed/400" if status == 400 else b""
        self.send_response(status)
        self.send_header("Location", "https://elsewhere.example/hook")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(("127.0.0.1", 0), Handler)
    server.received, server.answers = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_sink_retries_what_may_be_mended_and_gives_up_a_batch_refused_as_it_is(
    receiver: Receiver,
) -> None:
    """A 5xx, a token rotated (401, 403), a receiver not deployed yet (404) or moved (a redirect, never
    followed) may pass later: retried. A 400 says these rows never will: refused, every row of it."""
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    sink = HttpSink({"url": url, "headers": {"Authorization": "Bearer hook-token"}}, BRIDGE)
    mendable = [503, 401, 403, 404, 301, 307]
    receiver.answers = list(mendable)
    batch = [result(1), result(2)]
    for status in mendable:
        with pytest.raises(Unavailable, match=f"answered {status}") as caught:
            sink.write(batch)
        assert "hook-token" not in str(caught.value)
    sink.write(batch)
    headers, body = receiver.received[-1]
    assert headers["Authorization"] == "Bearer hook-token" and headers["Content-Type"] == "application/json"
    assert body["rows"] == [r.columns() for r in batch], "each row with its request id, to deduplicate by"
    with pytest.raises(Refused, match="400 Bad Request: bad row feed/400") as refused:
        sink.write([result(3), result(400)])
    assert refused.value.rows == 2
    receiver.server_close()
    with pytest.raises(Unavailable, match="cannot POST"):
        HttpSink({"url": "http://127.0.0.1:9/hook"}, BRIDGE).write(batch)


def test_every_file_sink_and_source_is_registered() -> None:
    from joey_connector_bridge.runners import SINKS, SOURCES
    from joey_core.bridges import SINK, SOURCE, SUPPORTED

    # A source following another pipeline (from_pipeline) has no connection type: "pipeline".
    assert sorted(SOURCES) == sorted([*SUPPORTED[SOURCE], "pipeline"])
    assert sorted(SINKS) == sorted(SUPPORTED[SINK])
    assert issubclass(SINKS["s3"], FileSink) and issubclass(SINKS["files"], FileSink)


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ({"roll_rows": 0}, "roll_rows"),
        ({"roll_seconds": 0}, "roll_seconds"),
        ({"roll_rows": "many"}, "roll_rows"),
    ],
)
def test_a_file_sinks_rolling_is_checked_with_its_connection(details: dict[str, Any], field: str) -> None:
    from joey_core.connections import InvalidDetails, connection_type

    for kind, base in (("files", {"path": "/data"}), ("s3", {"bucket": "scores"})):
        with pytest.raises(InvalidDetails) as caught:
            connection_type(kind).validate(base | details)
        assert caught.value.field == field
