"""Bulk inference against the real stack: files in every format, parallel batches with retries of the rows
that got no answer, and infer as an asyncio coroutine."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from joey.client import Client, Pipeline, bulk
from joey.client.bulk import InputFileError
from joey.client.inputs import InputError
from joey.client.streaming import InferenceTimeout, not_sent
from joey_core.replies import Reply
from joey_core.settings import CommonSettings
from tests.conftest import Stack
from train_model import make_records

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
BAD = {"features": [1.0, 2.0]}
"""A record the pipeline answers with an error: two features of four."""


@dataclass
class Counting(Pipeline):
    """The pipeline, counting the rows of each ``infer`` call: the one way anything is sent."""

    sent: list[int] = field(default_factory=list)

    def infer(self, data: Any, timeout: float = 60.0, progress: Any = None) -> Any:
        self.sent.append(len(data))
        return super().infer(data, timeout, progress)


@pytest.fixture(scope="module")
def iris(stack: Stack, settings: CommonSettings, iris_model: Path) -> Iterator[Pipeline]:
    client = Client(settings=settings)
    model = client.upload_model("iris-bulk", iris_model)
    pipeline = client.build_pipeline("iris-bulk").add_model_step(model)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


@pytest.fixture()
def counting(iris: Pipeline) -> Counting:
    return Counting(iris.client, iris.name)


def same_results(result: pd.DataFrame | pa.Table, expected: pd.DataFrame) -> None:
    """``result`` has the columns, inputs, outputs and errors of ``expected``, row for row."""
    frame = result.to_pandas() if isinstance(result, pa.Table) else result
    errors = values(frame["error"]) if "error" in frame else None
    assert list(frame.columns) == list(expected.columns), f"errors: {errors}"
    assert [list(v) for v in frame["in.features"]] == [list(v) for v in expected["in.features"]]
    assert values(frame["out.label"]) == values(expected["out.label"])
    assert values(frame["error"]) == values(expected["error"])
    assert frame["request_id"].is_unique


def values(column: pd.Series) -> list[Any]:
    """The values of a column, a missing one as None, whatever the dtype (an Arrow table's integers with a
    gap come to pandas as floats)."""
    return [None if pd.isna(v) else int(v) if isinstance(v, float) else v for v in column.tolist()]


def records_with_a_bad_one() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = make_records(16, seed=31)
    return records[:9] + [BAD] + records[9:]


def write_json(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(records))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n\n" for r in records))  # blank lines are skipped


def write_arrow_file(path: Path, records: list[dict[str, Any]]) -> None:
    feather.write_feather(pa.Table.from_pylist(records), path, chunksize=3)


def write_arrow_stream(path: Path, records: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)


def write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=5)


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], None]] = {
    "records.json": write_json,
    "records.jsonl": write_jsonl,
    "records.feather": write_arrow_file,
    "records.arrows": write_arrow_stream,
    "records.parquet": write_parquet,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_file_format_gives_what_infer_gives_for_its_rows(
    counting: Counting, tmp_path: Path, name: str
) -> None:
    records = records_with_a_bad_one()
    path = tmp_path / name
    WRITERS[name](path, records)
    seen: list[tuple[int, int]] = []

    result = counting.infer_from_file(path, chunk_rows=7, progress=lambda *a: seen.append(a))

    assert counting.sent == [7, 7, 3], "read and sent a chunk at a time"
    assert isinstance(result, pd.DataFrame if name.startswith("records.json") else pa.Table)
    same_results(result, counting.infer(records))
    assert seen[-1] == (17, 17) and all(total == 17 for _, total in seen)


def test_a_json_file_holding_one_object_is_one_record(counting: Counting, tmp_path: Path) -> None:
    record = make_records(1, seed=44)[0]
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record, indent=2))  # pretty-printed: no line of it is JSON alone

    result = counting.infer_from_file(path)

    assert counting.sent == [1]
    same_results(result, counting.infer([record]))


def test_feature_columns_of_a_file_are_packed_as_infer_packs_a_frame(iris: Pipeline, tmp_path: Path) -> None:
    frame = pd.DataFrame([r["features"] for r in make_records(9, seed=32)], columns=COLUMNS)
    expected = iris.infer(frame)
    frame.to_json(tmp_path / "frame.json", orient="records")
    frame.to_parquet(tmp_path / "frame.parquet")
    same_results(iris.infer_from_file(tmp_path / "frame.json", chunk_rows=4), expected)
    same_results(iris.infer_from_file(tmp_path / "frame.parquet", chunk_rows=4), expected)


def bad_jsonl(path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(12)) + "{not json\n")
    return "is neither JSON nor JSON lines: line 13: Expecting property name"


def not_a_record(path: Path) -> str:
    path.write_text(json.dumps([*make_records(12), [1, 2, 3, 4]]))
    return "item 12 of the array is a list, not a JSON object"


def garbage_parquet(path: Path) -> str:
    path.write_bytes(b"PAR1 but not really" * 10)
    return "is not a Parquet file that can be read"


def garbage_arrow(path: Path) -> str:
    path.write_bytes(b"\x00" * 100)
    return "is not an Arrow IPC file or stream that can be read"


def feather_v1(path: Path) -> str:
    # Its magic bytes at both ends (pyarrow deprecates writing it).
    path.write_bytes(b"FEA1" + b"\x00" * 64 + b"FEA1")
    return "is a Feather version 1 file"


def nan_after_the_first_chunk(path: Path) -> str:
    frame = pd.DataFrame([r["features"] for r in make_records(12, seed=33)], columns=COLUMNS)
    frame.iloc[10, 2] = float("nan")
    frame.to_parquet(path)
    return "pipeline 'iris-bulk' reads 'features' (float32 [4]): row 10, column 'petal_length' is NaN"


def unknown_suffix(path: Path) -> str:
    write_json(path, make_records(3))
    return "cannot tell the format of"


BAD_FILES: dict[str, Callable[[Path], str]] = {
    "bad.jsonl": bad_jsonl,
    "not-a-record.json": not_a_record,
    "garbage.parquet": garbage_parquet,
    "garbage.arrow": garbage_arrow,
    "v1.feather": feather_v1,
    "nan.parquet": nan_after_the_first_chunk,
    "records.csv": unknown_suffix,
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_is_refused_with_its_reason_before_anything_is_sent(
    counting: Counting, tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    reason = BAD_FILES[name](path)
    with pytest.raises(InputFileError) as refused:
        counting.infer_from_file(path, chunk_rows=4)
    assert str(path) in refused.value.message and reason in refused.value.message, refused.value.message
    assert counting.sent == []


@dataclass
class TimingOutOnce(Counting):
    """The pipeline, its ``infer`` call number ``call`` getting no reply in time for any row."""

    call: int = 1
    timed_out: list[str] = field(default_factory=list)

    def infer(self, data: Any, timeout: float = 60.0, progress: Any = None) -> Any:
        if len(self.sent) == self.call:
            self.sent.append(len(data))
            self.timed_out += [f"timed-out-{i}" for i in range(len(data))]
            raise InferenceTimeout([None] * len(data), timeout, self.timed_out[-len(data) :], set())
        return super().infer(data, timeout, progress)


def test_a_chunk_that_times_out_fails_its_rows_and_keeps_the_file_s_other_results(
    iris: Pipeline, tmp_path: Path
) -> None:
    records = make_records(10, seed=39)
    path = tmp_path / "records.jsonl"
    write_jsonl(path, records)
    pipeline = TimingOutOnce(iris.client, iris.name)

    result = pipeline.infer_from_file(path, chunk_rows=4, timeout=5)

    assert pipeline.sent == [4, 4, 2]
    assert isinstance(result, pd.DataFrame) and len(result) == 10
    errors = result["error"].tolist()
    assert [pd.isna(e) for e in errors] == [i not in (4, 5, 6, 7) for i in range(10)], errors
    assert all(errors[i] == "no reply from the pipeline within 5s" for i in (4, 5, 6, 7)), errors
    # Their request ids, to look them up in the logs: they may reach the pipeline yet.
    assert result["request_id"][4:8].tolist() == pipeline.timed_out
    assert values(result["out.label"][:4]) == values(iris.infer(records[:4])["out.label"])


@pytest.mark.parametrize(("checked", "sent"), [(0, 5), (3, 8), (6, 2)])
def test_a_file_that_changes_between_the_check_and_the_sending_is_refused(
    counting: Counting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checked: int, sent: int
) -> None:
    path = tmp_path / "records.jsonl"
    write_jsonl(path, make_records(checked, seed=42))
    reads = [0]
    chunks = bulk._chunks

    def changing(*args: Any) -> Iterator[Any]:
        reads[0] += 1
        if reads[0] == 2:  # the sending pass: the file has changed since the check
            write_jsonl(path, make_records(sent, seed=43))
        return chunks(*args)

    monkeypatch.setattr(bulk, "_chunks", changing)
    with pytest.raises(
        InputFileError, match=f"changed while it was being read: {checked} records were checked"
    ):
        counting.infer_from_file(path, chunk_rows=3)
    assert counting.sent == ([min(checked, sent)] if checked else []), "checked rows only"


def test_parallel_infer_returns_every_row_in_input_order_with_its_errors(counting: Counting) -> None:
    records = records_with_a_bad_one() + [BAD] + make_records(11, seed=34)
    expected = counting.infer(records)
    counting.sent.clear()

    seen: list[tuple[int, int]] = []

    result = counting.parallel_infer(
        records, batch_size=5, num_parallel=3, progress=lambda *a: seen.append(a)
    )

    assert sorted(counting.sent) == [4] + [5] * 5
    same_results(result, expected)
    # As each batch completes, not once per round.
    assert [total for _, total in seen] == [29] * 6 and sorted(done for done, _ in seen) == [
        done for done, _ in seen
    ]
    assert seen[-1] == (29, 29)
    errors = result["error"]
    assert errors.notna().tolist() == [r is BAD for r in records]


def test_parallel_infer_shapes_frames_and_answers_arrow_with_arrow(iris: Pipeline) -> None:
    frame = pd.DataFrame([r["features"] for r in make_records(11, seed=35)], columns=COLUMNS)
    same_results(iris.parallel_infer(frame, batch_size=3, num_parallel=2), iris.infer(frame))
    table = pa.Table.from_pylist(records_with_a_bad_one())
    result = iris.parallel_infer(table, batch_size=4, num_parallel=2)
    assert isinstance(result, pa.Table)
    same_results(result, iris.infer(records_with_a_bad_one()))


def test_parallel_infer_refuses_data_that_does_not_fit_before_sending(counting: Counting) -> None:
    frame = pd.DataFrame([r["features"] for r in make_records(11, seed=36)], columns=COLUMNS)
    frame.iloc[9, 1] = float("inf")
    with pytest.raises(InputError, match="row 9, column 'sepal_width' is inf"):
        counting.parallel_infer(frame, batch_size=2)
    assert counting.sent == []


def test_parallel_infer_refuses_a_record_that_is_no_dict_before_sending_naming_it_as_in_the_data(
    counting: Counting,
) -> None:
    records: list[Any] = make_records(14, seed=45)
    records[12] = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(InputError, match="record 12 is a list"):
        counting.parallel_infer(records, batch_size=5)
    assert counting.sent == []


def test_an_interrupt_stops_parallel_infer_and_cancels_the_batches_not_started(counting: Counting) -> None:
    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt  # as Ctrl-C does, in the calling thread, at the first completed batch

    with pytest.raises(KeyboardInterrupt):
        counting.parallel_infer(make_records(10, seed=46), batch_size=1, num_parallel=1, progress=interrupt)
    # The batch that completed, the one running, and the one made ahead at most: none of the rest.
    assert len(counting.sent) <= 3, counting.sent


@dataclass
class Unanswered(Counting):
    """The pipeline, its first ``infer`` call answering none of its rows in time: row 0 with no reply, row 1
    not sent, row 2 with no reply, row 3 an error of the pipeline whose text reads like a row not sent."""

    ids: list[str] = field(default_factory=lambda: [f"unanswered-{i}" for i in range(4)])

    def infer(self, data: Any, timeout: float = 60.0, progress: Any = None) -> Any:
        if self.sent:
            return super().infer(data, timeout, progress)
        self.sent.append(len(data))
        now = datetime.now(UTC).isoformat()
        replies = [
            None,
            not_sent(self.ids[1], "purged from the producer's queue"),
            None,
            Reply(
                self.ids[3],
                False,
                {
                    "time": now,
                    "error": "not sent to the pipeline: a model's words",
                    "metadata": {"pipeline_version": 1},
                },
            ),
        ]
        raise InferenceTimeout(replies, timeout, self.ids, set())


@pytest.mark.parametrize("retry_timed_out", [False, True])
def test_parallel_infer_retries_rows_not_sent_and_rows_timed_out_only_when_asked(
    iris: Pipeline, retry_timed_out: bool
) -> None:
    pipeline = Unanswered(iris.client, iris.name)
    records = make_records(4, seed=47)

    result = pipeline.parallel_infer(records, batch_size=4, timeout=5, retry_timed_out=retry_timed_out)

    # A row that timed out may still be on its way to the pipeline: sent again, it would be processed twice.
    assert pipeline.sent == ([4, 3] if retry_timed_out else [4, 1])
    errors = result["error"].tolist()
    assert pd.isna(errors[1]), "the row not sent was sent again, and answered"
    assert errors[3] == "not sent to the pipeline: a model's words", "the pipeline's answer is kept"
    ids = result["request_id"].tolist()
    if retry_timed_out:
        assert pd.isna(errors[0]) and pd.isna(errors[2])
    else:
        assert errors[0] == errors[2] == "no reply from the pipeline within 5s"
        assert [ids[0], ids[2]] == [pipeline.ids[0], pipeline.ids[2]], "to be found in the logs"
    assert ids[3] == pipeline.ids[3] and len(set(ids)) == 4


def test_parallel_infer_retries_only_the_rows_not_sent(counting: Counting) -> None:
    records = make_records(10, seed=37)
    # Larger than the producer's message.max.bytes: never sent, however often it is tried.
    huge = {"features": [1.0] * 500_000}
    records = records[:4] + [huge] + records[4:6] + [BAD] + records[6:]

    result = counting.parallel_infer(records, batch_size=4, num_parallel=2, retries=2)

    # The first round sends every row; each retry sends the one row that got no answer, never the row
    # the pipeline answered with an error.
    assert sorted(counting.sent) == [1, 1, 4, 4, 4]
    assert len(result) == len(records) and result["request_id"].is_unique
    errors = result["error"].tolist()
    assert errors[4].startswith("not sent to the pipeline: ") and "too large" in errors[4].lower()
    assert "features" in errors[7], errors[7]
    assert [pd.isna(e) for e in errors] == [i not in (4, 7) for i in range(len(records))]
    assert list(result["in.features"][10]) == records[10]["features"]


def test_parallel_infer_with_a_tiny_timeout_keeps_one_row_per_record(counting: Counting) -> None:
    records = make_records(3, seed=38)
    # Few replies come within a millisecond (which rows, the load decides; Unanswered above retries them
    # deterministically): whatever came, each record has one row, answered or failed saying why.
    result = counting.parallel_infer(records, batch_size=3, retries=1, timeout=0.001, retry_timed_out=True)
    assert counting.sent[0] == 3 and sum(counting.sent[1:]) <= 3
    assert len(result) == 3 and result["request_id"].is_unique
    for error in result["error"]:
        assert pd.isna(error) or error.startswith(
            ("no reply from the pipeline within 0.001s", "not sent to the pipeline")
        ), error


def test_async_infer_runs_beside_the_event_loop_and_gathered_calls_get_their_own_results(
    iris: Pipeline,
) -> None:
    batches = [make_records(3 + i, seed=40 + i) for i in range(3)]
    # The calls' progress callbacks (in the calls' threads) wait for a task of the event loop: if a call
    # blocked the loop, that task could not run until the call ended, and the wait would time out.
    in_progress, loop_ran = threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        in_progress.set()
        assert loop_ran.wait(20), "the event loop did not run while infer was waiting"

    async def loop_task() -> None:
        assert await asyncio.to_thread(in_progress.wait, 20), "no call reported progress"
        loop_ran.set()

    async def main() -> list[Any]:
        calls = asyncio.gather(*(iris.async_infer(b, progress=progress) for b in batches))
        _, results = await asyncio.gather(loop_task(), calls)
        return list(results)

    results = asyncio.run(main())
    for batch, result in zip(batches, results, strict=True):
        same_results(result, iris.infer(batch))
