"""Data the way users hold it: per-feature DataFrames and numpy arrays shaped for the pipeline's input
(``joey.client.inputs``), or refused before anything is sent; then the same through ``Pipeline.infer``
against a deployed iris pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pytest

from joey.client import Client, JoeyError, Pipeline
from joey.client.inputs import InputError, RecordInput, to_records
from joey.client.streaming import PipelineStream
from joey_core.models import TensorSpec
from joey_core.settings import CommonSettings
from joey_core.topics import pipeline_topics
from tests.conftest import Stack
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


def test_nan_is_sent_as_null() -> None:
    frame = pd.DataFrame([[1.0, np.nan, 3.0, 4.0]], columns=COLUMNS)
    assert to_records(frame, iris_signature, "iris") == [{"features": [1.0, None, 3.0, 4.0]}]
    array = np.array([[1.0, 2.0, np.inf, 4.0]])
    assert to_records(array, iris_signature, "iris") == [{"features": [1.0, 2.0, None, 4.0]}]


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
            pd.DataFrame([[1.0, 2.0, 3.0, True]], columns=COLUMNS),
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
    stream = PipelineStream(settings, pipeline_topics("default", "never-created"))
    with pytest.raises(InputError, match="record 1 is a list, not a dict mapping input names to values"):
        stream.infer([{"features": [1, 2, 3, 4]}, [1, 2, 3, 4]], timeout=5)


@pytest.fixture(scope="module")
def iris(stack: Stack, settings: CommonSettings, iris_model: Path) -> Iterator[Pipeline]:
    client = Client(settings=settings)
    model = client.upload_model("iris-inputs", iris_model)
    pipeline = client.build_pipeline("iris-inputs").add_model_step(model)
    pipeline.deploy(replicas=1, timeout=90)
    yield pipeline
    pipeline.undeploy()


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
    with pytest.raises(JoeyError) as refused:
        iris.infer(pd.DataFrame([[1.0, 2.0, 3.0]], columns=COLUMNS[:3]), timeout=60)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "pipeline 'iris-inputs' reads record field 'features' (float32 [4])" in refused.value.message
    with pytest.raises(JoeyError, match="has shape \\[4\\]; for one record, add the batch dimension"):
        iris.infer(np.array([5.1, 3.5, 1.4, 0.2]), timeout=60)


def test_nan_fails_its_record_naming_the_element_and_why(iris: Pipeline) -> None:
    frame = pd.DataFrame([[5.1, 3.5, 1.4, 0.2], [6.7, np.nan, 5.2, 2.3]], columns=COLUMNS)
    results = iris.infer(frame, timeout=60)
    assert isinstance(results, pd.DataFrame)
    assert pd.isna(results["error"].iloc[0])
    assert (
        results["error"]
        .iloc[1]
        .startswith("input 'features' must hold float32 values, got null at element [1]: JSON has no NaN")
    )
