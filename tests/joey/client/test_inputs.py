"""Data the way users hold it: per-feature DataFrames and numpy arrays shaped for the pipeline's input
(``joey.client.inputs``), or refused before anything is sent; then the same through ``Pipeline.infer``
against a deployed iris pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest

from joey.client import Client, JoeyError, Pipeline
from joey.client.inputs import InputError, RecordInput, to_records
from joey.client.pipelines import INFER_CHUNK_ROWS
from joey.client.streaming import PipelineStream
from joey_core import kafka
from joey_core.models import TensorSpec
from joey_core.records import dumps_text
from joey_core.settings import CommonSettings
from joey_core.topics import pipeline_topics
from tests.conftest import Stack, wait_until
from train_model import make_records  # examples/, put on sys.path by conftest

FEATURES = RecordInput("features", TensorSpec("features", "float32", (-1, 4)))
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_signature() -> list[RecordInput]:
    return [FEATURES]


def test_per_feature_columns_are_packed_in_the_frames_column_order() -> None:
    frame = pd.DataFrame({"b": [2.0, 20.0], "a": [1.0, 10.0], "d": [4, 40], "c": [3.5, 30.5]})
    assert to_records(frame, iris_signature, "iris") == [
        {"features": [2.0, 1.0, 4.0, 3.5]},
        {"features": [20.0, 10.0, 40.0, 30.5]},
    ]
    ints = pd.DataFrame([[1, 2, 3, 4]], columns=COLUMNS)
    assert to_records(ints, iris_signature, "iris") == [{"features": [1, 2, 3, 4]}]
    # An Arrow table with per-feature columns is packed the same way.
    assert to_records(pa.Table.from_pandas(frame), iris_signature, "iris") == to_records(
        frame, iris_signature, "iris"
    )


def test_a_frame_naming_the_input_is_sent_as_it_is() -> None:
    frame = pd.DataFrame({"features": [[1.0, 2.0, 3.0, 4.0]], "id": [7]})
    assert to_records(frame, iris_signature, "iris") == [{"features": [1.0, 2.0, 3.0, 4.0], "id": 7}]


def test_nan_in_a_frame_naming_the_input_is_sent_as_null() -> None:
    frame = pd.DataFrame({"features": [[1.0, np.nan, 3.0, 4.0]], "weight": [np.nan]})
    assert to_records(frame, iris_signature, "iris") == [
        {"features": [1.0, np.nan, 3.0, 4.0], "weight": None}
    ]
    assert (
        dumps_text(to_records(frame, iris_signature, "iris"))
        == '[{"features":[1.0,null,3.0,4.0],"weight":null}]'
    )


def test_a_frame_naming_the_input_keeps_full_precision() -> None:
    third = 1 / 3
    frame = pd.DataFrame({"features": [[third] * 4], "weight": [third]})
    assert to_records(frame, iris_signature, "iris") == [{"features": [third] * 4, "weight": third}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            pd.DataFrame([[1.0, 2.0, 3.0, 4.0], [1.0, np.nan, 3.0, 4.0]], columns=COLUMNS, index=[10, 11]),
            "pipeline 'iris' reads 'features' (float32 [4]): row 11, column 'sepal_width' is NaN (or "
            "missing), but inputs must be finite numbers (JSON has no NaN); fill or drop missing values "
            "before calling infer",
        ),
        (
            pd.DataFrame([[1.0, 2.0, np.inf, 4.0]], columns=COLUMNS, index=["a"]),
            "row 'a', column 'petal_length' is inf, but inputs must be finite numbers",
        ),
        (
            pd.DataFrame([[1, 2, 3, None]], columns=COLUMNS, dtype="Int64"),
            "row 0, column 'petal_width' is NaN (or missing)",
        ),
        (np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, -np.inf, 4.0]]), "row 1, element [2] is -inf"),
        (
            pd.DataFrame([[1.0, 2.0, 3.0, 1e39]], columns=COLUMNS),
            "row 0, column 'petal_width' is 1e+39, out of range for float32",
        ),
    ],
)
def test_values_the_engine_refuses_are_refused_naming_where_they_are(data: object, message: str) -> None:
    with pytest.raises(InputError) as refused:
        to_records(data, iris_signature, "iris")  # type: ignore[arg-type]
    assert message in refused.value.message


COUNTS = RecordInput("counts", TensorSpec("counts", "int64", (-1, 3)))


def counts_signature() -> list[RecordInput]:
    return [COUNTS]


def test_an_integer_input_gets_integers() -> None:
    # Integral floats (a column made float by another one, or by pandas) are sent as integers.
    frame = pd.DataFrame({"a": [1.0, 4.0], "b": [2, 5], "c": [3.0, 6.0]})
    records = to_records(frame, counts_signature, "p")
    assert records == [{"counts": [1, 2, 3]}, {"counts": [4, 5, 6]}]
    assert all(type(v) is int for r in records for v in r["counts"])
    nullable = pd.DataFrame({"a": [1, 4], "b": [2, 5], "c": [3, 6]}, dtype="Int64")
    assert to_records(nullable, counts_signature, "p") == [{"counts": [1, 2, 3]}, {"counts": [4, 5, 6]}]
    array = to_records(np.array([[1.0, 2.0, 3.0]]), counts_signature, "p")
    assert array == [{"counts": [1, 2, 3]}]
    assert all(type(v) is int for v in array[0]["counts"])
    # Booleans are 0 and 1 to a numeric input (the engine refuses JSON true for a number).
    assert to_records(np.array([[True, False, True]]), counts_signature, "p") == [{"counts": [1, 0, 1]}]
    unsigned = RecordInput("u", TensorSpec("u", "uint64", (-1, 1)))
    assert to_records(np.array([[2**64 - 1]], dtype=np.uint64), lambda: [unsigned], "p") == [
        {"u": [2**64 - 1]}
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            pd.DataFrame({"a": [1.0, 4.0], "b": [2.0, 5.5], "c": [3.0, 6.0]}),
            "pipeline 'p' reads 'counts' (int64 [3]): row 1, column 'b' is 5.5, a non-integer number; round "
            "or convert the values (e.g. frame.round().astype('int64')) if that is what is meant",
        ),
        (
            pd.DataFrame({"a": [1, None], "b": [2, 5], "c": [3, 6]}, dtype="Int64"),
            "row 1, column 'a' is NaN (or missing)",
        ),
        (np.array([[1.0, 2.5, 3.0]]), "row 0, element [1] is 2.5, a non-integer number"),
        (
            pd.DataFrame({"a": np.array([2**64 - 1], dtype=np.uint64), "b": [2], "c": [3]}),
            "row 0, column 'a' is 18446744073709551615, out of range for int64",
        ),
        (
            np.array([[1.0, 2.0, 2.0**63]]),
            "row 0, element [2] is 9.223372036854776e+18, out of range for int64",
        ),
        (
            np.array([[1 + 2j, 0, 0]]),
            "reads 'counts' (int64 [3]), which takes int64 values, not complex128 values",
        ),
        (np.array([["1", "2", "3"]]), "which takes int64 values, not <U1 values"),
    ],
)
def test_what_an_integer_input_cannot_take_is_refused(data: object, message: str) -> None:
    with pytest.raises(InputError) as refused:
        to_records(data, counts_signature, "p")  # type: ignore[arg-type]
    assert message in refused.value.message


def test_booleans_are_numbers_to_a_numeric_input() -> None:
    # pd.get_dummies writes bool columns (pandas >= 2).
    frame = pd.get_dummies(pd.Series(["a", "c", "b"]), dtype=bool).assign(d=[1.5, 2.5, 3.5])
    assert to_records(frame, iris_signature, "iris") == [
        {"features": [1.0, 0.0, 0.0, 1.5]},
        {"features": [0.0, 0.0, 1.0, 2.5]},
        {"features": [0.0, 1.0, 0.0, 3.5]},
    ]
    assert to_records(np.array([[True, False, True, True]]), iris_signature, "iris") == [
        {"features": [1.0, 0.0, 1.0, 1.0]}
    ]
    nullable = pd.DataFrame([[True, False, True, False]], columns=COLUMNS, dtype="boolean")
    assert to_records(nullable, iris_signature, "iris") == [{"features": [1.0, 0.0, 1.0, 0.0]}]


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame([[1, 2, 3, 4]], columns=["a", "b", "a", "c"]),
        pd.DataFrame([[1.0, 2.0, 3.0, 4.0]], columns=["a", "b", "a", "c"]),
        pd.DataFrame([[[1.0, 2.0, 3.0, 4.0], 1, 2]], columns=["features", "id", "id"]),
    ],
)
def test_duplicate_column_names_are_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(InputError) as refused:
        to_records(frame, iris_signature, "iris")
    assert refused.value.message.startswith("the frame has more than one column named 'a'") or (
        refused.value.message.startswith("the frame has more than one column named 'id'")
    )
    assert "names must be unique; rename or drop the duplicates" in refused.value.message
    with pytest.raises(InputError, match="more than one column named"):
        to_records(
            pa.Table.from_arrays([pa.array([1.0])] * 4, names=["a", "b", "a", "c"]), iris_signature, "iris"
        )


def test_a_number_input_takes_one_numeric_column() -> None:
    scalar = RecordInput("x", TensorSpec("x", "float32", (-1,)))
    assert to_records(pd.DataFrame({"v": [1.5, 2]}), lambda: [scalar], "p") == [{"x": 1.5}, {"x": 2.0}]
    with pytest.raises(InputError, match="pass one numeric column, whose values are sent as 'x', or name"):
        to_records(pd.DataFrame({"v": [1.5], "w": [2]}), lambda: [scalar], "p")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            pd.DataFrame([[1.0, 2.0, 3.0]], columns=COLUMNS[:3]),
            "pipeline 'iris' reads record field 'features' (float32 [4]), and the frame has 3 columns "
            "('sepal_length', 'sepal_width', 'petal_length'): pass exactly 4 numeric columns, which are "
            "packed into 'features' in the frame's column order",
        ),
        (
            pd.DataFrame([[1.0, 2.0, 3.0, 4.0, "setosa"]], columns=[*COLUMNS, "species"]),
            "the frame has 5 columns ('sepal_length', 'sepal_width', 'petal_length', 'petal_width', "
            "'species'), 1 of them not numeric ('species'): pass exactly 4 numeric columns",
        ),
        (
            pd.DataFrame([[1.0, 2.0, 3.0, 1 + 1j]], columns=COLUMNS),
            "1 of them not numeric ('petal_width')",
        ),
    ],
)
def test_a_frame_that_cannot_be_packed_is_refused_saying_how(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(InputError) as refused:
        to_records(frame, iris_signature, "iris")
    assert message in refused.value.message
    assert "or one column 'features' holding a list of 4 numbers per row" in refused.value.message
    assert refused.value.code == "INVALID_ARGUMENT"


def test_two_inputs_are_never_guessed() -> None:
    two = [
        RecordInput("a", TensorSpec("a", "float32", (-1, 2))),
        RecordInput("b", TensorSpec("b", "float32", (-1, 2))),
    ]
    frame = pd.DataFrame([[1.0, 2.0, 3.0, 4.0]], columns=COLUMNS)
    with pytest.raises(
        InputError, match="reads record fields 'a' \\(float32 \\[2\\]\\), 'b'.*one column per field"
    ):
        to_records(frame, lambda: two, "p")
    with pytest.raises(InputError, match="a numpy array cannot say which field each value feeds"):
        to_records(np.zeros((3, 2)), lambda: two, "p")


def test_arrays_become_one_record_per_row() -> None:
    assert to_records(np.arange(8, dtype=np.float32).reshape(2, 4), iris_signature, "iris") == [
        {"features": [0.0, 1.0, 2.0, 3.0]},
        {"features": [4.0, 5.0, 6.0, 7.0]},
    ]
    scalar = RecordInput("x", TensorSpec("x", "int64", (-1,)))
    assert to_records(np.array([3, 4]), lambda: [scalar], "p") == [{"x": 3}, {"x": 4}]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (4,),
            "pipeline 'iris' reads 'features' (float32 [4]): an array for it has shape [-1, 4], one row "
            "per record, but this one has shape [4]; for one record, add the batch dimension: "
            "array.reshape(1, 4)",
        ),
        ((2, 3), "but this one has shape [2, 3]"),
        ((), "but this one has shape []"),
    ],
)
def test_arrays_that_do_not_fit_are_refused(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(InputError) as refused:
        to_records(np.zeros(shape), iris_signature, "iris")
    assert message in refused.value.message


def test_rows_that_are_not_records_are_refused_before_anything_is_sent(settings: CommonSettings) -> None:
    kafka.ensure_topics(
        kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, "default", "no-engine")
    )
    with (
        closing(PipelineStream(settings, pipeline_topics("default", "no-engine"))) as stream,
        pytest.raises(InputError, match="record 1 is a list, not a dict mapping input names to values"),
    ):
        stream.infer([{"features": [1, 2, 3, 4]}, [1, 2, 3, 4]], timeout=5)


@pytest.fixture(scope="module")
def iris(stack: Stack, settings: CommonSettings, iris_model: Path) -> Iterator[Pipeline]:
    client = Client(settings=settings)
    model = client.upload_model("iris-inputs", iris_model)
    pipeline = client.build_pipeline("iris-inputs").add_model_step(model)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


def test_a_bad_value_past_the_first_chunk_is_refused_before_anything_is_sent_naming_its_row(
    iris: Pipeline,
) -> None:
    features = np.array([r["features"] for r in make_records(INFER_CHUNK_ROWS + 10, seed=22)])
    features[INFER_CHUNK_ROWS + 3, 1] = np.nan
    frame = pd.DataFrame(features, columns=COLUMNS)
    with pytest.raises(InputError, match=f"row {INFER_CHUNK_ROWS + 3}, column 'sepal_width' is NaN"):
        iris.infer(frame, timeout=60)
    with pytest.raises(InputError, match=f"row {INFER_CHUNK_ROWS + 3}, element \\[1\\] is NaN"):
        iris.infer(features, timeout=60)


def labels(model: Path, features: np.ndarray) -> list[int]:
    session = ort.InferenceSession(str(model))
    return [int(v) for v in session.run(["label"], {"features": features.astype(np.float32)})[0]]


def test_infer_takes_a_per_feature_frame_and_an_array(iris: Pipeline, iris_model: Path) -> None:
    features = np.array([r["features"] for r in make_records(12, seed=21)])
    frame = pd.DataFrame(features, columns=COLUMNS)
    by_columns = iris.infer(frame, timeout=60)
    assert isinstance(by_columns, pd.DataFrame)
    assert by_columns["error"].isna().all(), by_columns["error"].tolist()
    assert [int(v) for v in by_columns["out.label"]] == labels(iris_model, features)
    assert by_columns["in.features"].tolist() == features.tolist()

    by_rows = iris.infer(features, timeout=60)
    assert isinstance(by_rows, pd.DataFrame)
    assert [int(v) for v in by_rows["out.label"]] == labels(iris_model, features)


def test_infer_refuses_what_it_cannot_shape_before_sending(iris: Pipeline) -> None:
    # Values seen nowhere else, so the log shows whether any of them was sent.
    refused = [9.125, 8.125, 7.125]
    with pytest.raises(JoeyError) as error:
        iris.infer(pd.DataFrame([refused], columns=COLUMNS[:3]), timeout=60)
    assert error.value.code == "INVALID_ARGUMENT"
    assert "pipeline 'iris-inputs' reads record field 'features' (float32 [4])" in error.value.message
    with pytest.raises(JoeyError, match="has shape \\[4\\]; for one record, add the batch dimension"):
        iris.infer(np.array([*refused, 6.125]), timeout=60)
    with pytest.raises(JoeyError, match="row 0, column 'petal_width' is NaN \\(or missing\\)"):
        iris.infer(pd.DataFrame([[*refused, np.nan]], columns=COLUMNS), timeout=60)

    # A record sent after the refused data is logged; none of the refused values ever were.
    sentinel = [4.875, 3.125, 1.625, 0.375]
    assert iris.infer({"features": sentinel}, timeout=60)["error"].isna().all()
    logs = pd.DataFrame()

    def sentinel_logged() -> bool:
        nonlocal logs
        logs = iris.logs(limit=1000)
        # Empty (no columns) until the first log row is stored: infer answers before the logger stores.
        return "in.features" in logs and sentinel in logs["in.features"].tolist()

    wait_until(sentinel_logged, 60, "the record after the refused data in the inference log")
    assert [c for c in logs.columns if c.startswith("in.")] == ["in.features"]
    assert not [v for v in logs["in.features"] if isinstance(v, list) and set(v) & set(refused)]


def test_the_signature_is_fetched_once_per_deployed_version(
    iris: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[str] = []
    call = iris.client.call

    def counting(method: str, request: object) -> object:
        fetched.append(method)
        return call(method, request)  # type: ignore[arg-type]

    monkeypatch.setattr(iris.client, "call", counting)
    frame = pd.DataFrame([[5.1, 3.5, 1.4, 0.2]], columns=COLUMNS)
    for data in (frame, frame, frame.to_numpy()):
        assert iris.infer(data, timeout=60)["error"].isna().all()
    # Of the registry's status, infer asks at most once per status_cache_s (see test_client.py).
    assert fetched.count("GetPipeline") <= 1


def test_nan_in_a_named_column_fails_its_record_naming_the_element_and_why(iris: Pipeline) -> None:
    frame = pd.DataFrame({"features": [[5.1, 3.5, 1.4, 0.2], [6.7, np.nan, 5.2, 2.3]]})
    results = iris.infer(frame, timeout=60)
    assert isinstance(results, pd.DataFrame)
    assert pd.isna(results["error"].iloc[0])
    assert (
        results["error"]
        .iloc[1]
        .startswith("input 'features' must hold float32 values, got null at element [1]: JSON has no NaN")
    )
