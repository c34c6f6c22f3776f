"""Python steps in the engine: user code runs in a sandbox process that the runtime restarts after a
crash or a timeout; user errors and broken return values name the problem; the pipeline runner fails a
hung batch as a whole, and only the culprits of a crash or a user exception."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from joey_core.models import TensorSpec
from joey_core.v1 import registry_pb2
from joey_engine.deployment import Deployment, Step
from joey_engine.pipeline import Failure, Success
from joey_engine.replica import load_runner
from joey_engine.runtime import PythonRuntime, RuntimeAborted, create_runtime
from joey_engine.settings import EngineSettings
from tests.conftest import wait_until

SETTINGS = EngineSettings(instance_id="unit", python_step_timeout_s=1.5)

# Every call appends a line to CALLS, so tests count sandbox calls without timing anything.
STEP = """
import os, time
import numpy as np

CALLS = {calls!r}

def process_data(inputs):
    with open(CALLS, "a") as f:
        f.write(f"{{os.getpid()}} {{len(inputs['x'])}}\\n")
    x = inputs["x"]
    if (x < 0).any():
        raise ValueError(f"x must not be negative, got {{x.min()}}")
    if (x == 99).any():
        os._exit(7)
    if (x == 77).any():
        time.sleep(3600)
    {body}
"""


def signature(outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float64", (-1,)),)) -> Step:
    return Step("prep", 1, "0" * 64, "python", (TensorSpec("x", "float64", (-1,)),), outputs)


@pytest.fixture
def write_step(tmp_path: Path) -> Callable[..., Path]:
    def write(body: str = 'return {"y": x * 2}') -> Path:
        path = tmp_path / "step"  # artifacts are cached under their sha256, without a .py suffix
        path.write_text(STEP.format(calls=str(tmp_path / "calls"), body=body))
        return path

    return write


def calls(tmp_path: Path) -> list[tuple[int, int]]:
    """(sandbox pid, batch size) of each call so far."""
    path = tmp_path / "calls"
    lines = path.read_text().split("\n") if path.exists() else []
    return [(int(pid), int(n)) for pid, n in (line.split() for line in lines if line)]


@pytest.fixture
def runtime(write_step: Callable[..., Path]) -> Iterator[PythonRuntime]:
    runtime = PythonRuntime(SETTINGS)
    runtime.load(write_step(), signature())
    yield runtime
    runtime.close()


def batch(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.asarray(values, dtype=np.float64)}


def test_runs_process_data_in_another_process(runtime: PythonRuntime, tmp_path: Path) -> None:
    assert [(t.name, t.dtype, t.shape) for t in runtime.inputs] == [("x", "float64", (-1,))]
    out = runtime.predict(batch(1, 2.5))
    assert out["y"].tolist() == [2.0, 5.0] and out["y"].dtype == np.float64
    [(pid, n)] = calls(tmp_path)
    assert n == 2 and pid != os.getpid()


def test_user_exception_names_type_message_and_line(runtime: PythonRuntime) -> None:
    with pytest.raises(RuntimeError) as err:
        runtime.predict(batch(1, -3))
    assert not isinstance(err.value, RuntimeAborted)
    assert str(err.value).startswith(
        "ValueError: x must not be negative, got -3.0 (line 12, in process_data:"
    )
    assert runtime.predict(batch(4))["y"].tolist() == [8.0]  # the same process goes on


def test_crash_fails_the_call_and_the_next_call_runs_in_a_new_process(
    runtime: PythonRuntime, tmp_path: Path
) -> None:
    runtime.predict(batch(1))
    with pytest.raises(RuntimeAborted, match=r"^python step 'prep' process exited with code 7$"):
        runtime.predict(batch(1, 99))
    assert runtime.predict(batch(3))["y"].tolist() == [6.0]
    pids = [pid for pid, _ in calls(tmp_path)]
    assert len(pids) == 3 and pids[0] == pids[1] != pids[2]


def test_hang_is_killed_after_the_timeout_and_the_next_call_works(
    runtime: PythonRuntime, tmp_path: Path
) -> None:
    runtime.predict(batch(1))
    hung = runtime._sandbox
    assert hung is not None
    with pytest.raises(
        RuntimeAborted, match=r"^python step 'prep' timed out after 1.5 s; its process was killed$"
    ):
        runtime.predict(batch(77))
    assert hung.process.poll() is not None, "the hung process is gone"
    assert runtime.predict(batch(2))["y"].tolist() == [4.0]


def test_segfault_is_reported_with_its_signal(write_step: Callable[..., Path]) -> None:
    runtime = PythonRuntime(SETTINGS)
    runtime.load(write_step('import ctypes; ctypes.string_at(0); return {"y": x}'), signature())
    try:
        with pytest.raises(RuntimeAborted, match="process was killed by signal SIGSEGV"):
            runtime.predict(batch(1))
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("body", "outputs", "reason"),
    [
        ("return [x]", None, "process_data returned list, expected a dict of arrays by output name"),
        ('return {"z": x}', None, "process_data returned no output 'y'; the declared outputs are 'y'"),
        ('return {"y": x[:1]}', None, "output 'y' has shape [1], expected a first dimension of 2"),
        ('return {"y": np.stack([x, x], axis=1)}', None, "output 'y' has shape [2, 2], declared [?]"),
        (
            'return {"y": x * 1.5}',
            (TensorSpec("y", "int64", (-1,)),),
            "output 'y' has dtype float64, which does not convert to the declared int64",
        ),
        ('return {"y": [1, [2, 3]]}', None, "output 'y' is not a rectangular array"),
    ],
)
def test_return_value_is_checked_against_the_declared_outputs(
    write_step: Callable[..., Path], body: str, outputs: tuple[TensorSpec, ...] | None, reason: str
) -> None:
    runtime = PythonRuntime(SETTINGS)
    runtime.load(write_step(body), signature(outputs) if outputs else signature())
    try:
        with pytest.raises(RuntimeError, match="^" + reason.replace("[", r"\[").replace("?", r"\?")):
            runtime.predict(batch(1, 2))
    finally:
        runtime.close()


def test_outputs_are_cast_to_the_declared_dtype_and_strings_travel(write_step: Callable[..., Path]) -> None:
    runtime = create_runtime("python", SETTINGS)
    outputs = (TensorSpec("y", "float32", (-1,)), TensorSpec("name", "string", (-1,)))
    runtime.load(write_step('return {"y": [1, 2], "name": ["a", "bb"], "extra": x}'), signature(outputs))
    try:
        out = runtime.predict(batch(1, 2))
    finally:
        runtime.close()
    assert sorted(out) == ["name", "y"]
    assert out["y"].dtype == np.float32 and out["name"].tolist() == ["a", "bb"]
    assert [t.dtype for t in runtime.outputs] == ["float32", "str"]


def test_string_inputs_travel_even_as_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "step"
    path.write_text("def process_data(inputs):\n    return {'n': [len(s) for s in inputs['s']]}\n")
    runtime = PythonRuntime(SETTINGS)
    step = Step(
        "lengths",
        1,
        "0" * 64,
        "python",
        (TensorSpec("s", "string", (-1,)),),
        (TensorSpec("n", "int64", (-1,)),),
    )
    runtime.load(path, step)
    try:
        # As onnxruntime returns string outputs that feed this step.
        assert runtime.predict({"s": np.asarray(["a", "bcd"], dtype=object)})["n"].tolist() == [1, 3]
    finally:
        runtime.close()


def test_a_step_that_fails_to_import_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "step"
    path.write_text("import no_such_module_anywhere\ndef process_data(inputs):\n    return inputs\n")
    runtime = PythonRuntime(SETTINGS)
    with pytest.raises(RuntimeAborted, match="did not start: could not load the step: ModuleNotFoundError"):
        runtime.load(path, signature())


def test_sandbox_does_not_see_the_engines_settings(
    write_step: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOEY_DATABASE_URL", "postgresql://secret@db/joey")
    runtime = PythonRuntime(SETTINGS)
    runtime.load(
        write_step('return {"y": x * len([k for k in os.environ if k.startswith("JOEY_")])}'), signature()
    )
    try:
        assert runtime.predict(batch(1))["y"].tolist() == [0.0]
    finally:
        runtime.close()


ORPHAN = """
import sys, time
from pathlib import Path
import numpy as np
from joey_core.models import TensorSpec
from joey_engine.deployment import Step
from joey_engine.runtime import PythonRuntime
from joey_engine.settings import EngineSettings

x, y = TensorSpec("x", "float64", (-1,)), TensorSpec("y", "float64", (-1,))
step = Step("prep", 1, "0" * 64, "python", (x,), (y,))
runtime = PythonRuntime(EngineSettings(instance_id="unit", python_step_timeout_s=120))
runtime.load(Path(sys.argv[1]), step)
print(runtime._sandbox.process.pid, flush=True)
if sys.argv[2] == "busy":
    runtime.predict({"x": np.asarray([77.0])})  # hangs in user code
time.sleep(3600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it runs nothing and its parent (init) reaps it.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_sandbox_exits_when_its_replica_dies(
    write_step: Callable[..., Path], tmp_path: Path, state: str
) -> None:
    replica = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, str(write_step()), state], stdout=subprocess.PIPE, text=True
    )
    try:
        assert replica.stdout is not None
        sandbox_pid = int(replica.stdout.readline())
        assert alive(sandbox_pid)
        if state == "busy":
            wait_until(lambda: calls(tmp_path) == [(sandbox_pid, 1)], 10, "user code running")
    finally:
        replica.kill()
        replica.wait()
    wait_until(lambda: not alive(sandbox_pid), 10, f"sandbox of a killed replica exits ({state})")


def test_close_stops_the_sandbox(runtime: PythonRuntime) -> None:
    sandbox = runtime._sandbox
    assert sandbox is not None and sandbox.process.poll() is None
    runtime.close()
    assert sandbox.process.poll() is not None


# --- in the pipeline runner ---


@pytest.fixture
def python_pipeline(write_step: Callable[..., Path]) -> Iterator[Callable[[list[object]], list[object]]]:
    spec = registry_pb2.DeploymentSpec(
        workspace="engine-unit",
        pipeline="py",
        pipeline_version=1,
        deployment_id="d1",
        steps=[
            registry_pb2.ResolvedStep(
                model="prep",
                version=1,
                sha256="0" * 64,
                framework="python",
                inputs=[registry_pb2.TensorSpec(name="x", dtype="float64", shape=[-1])],
                outputs=[registry_pb2.TensorSpec(name="y", dtype="float64", shape=[-1])],
            )
        ],
    )
    from joey_engine.deployment import from_proto

    deployment: Deployment = from_proto(spec)
    runner = load_runner(SETTINGS, deployment, [write_step()])

    def run(rows: list[object]) -> list[object]:
        return list(runner.run([json.dumps(row).encode() for row in rows]))

    yield run
    for stage in runner._stages:
        stage.runtime.close()  # type: ignore[union-attr]


def test_user_exception_fails_only_the_culprits(
    python_pipeline: Callable[[list[object]], list[object]], tmp_path: Path
) -> None:
    results = python_pipeline([{"x": 1}, {"x": -2}, {"x": 3}, {"x": -4}])
    assert [r.outputs for r in results if isinstance(r, Success)] == [{"y": 2.0}, {"y": 6.0}]
    failed = [r for r in results if isinstance(r, Failure)]
    assert [r.inputs for r in failed] == [{"x": -2}, {"x": -4}]
    assert failed[0].reason.startswith(
        "step 1 (model 'prep' v1) failed: ValueError: x must not be negative, got -2.0 (line 12"
    )
    # The batch, then each record on its own.
    assert [n for _, n in calls(tmp_path)] == [4, 1, 1, 1, 1]


def test_hang_fails_the_batch_once_without_retrying_each_record(
    python_pipeline: Callable[[list[object]], list[object]], tmp_path: Path
) -> None:
    results = python_pipeline([{"x": 1}, {"x": 77}, {"x": 3}])
    assert all(isinstance(r, Failure) for r in results)
    assert {r.reason for r in results if isinstance(r, Failure)} == {
        "step 1 (model 'prep' v1) failed: python step 'prep' timed out after 1.5 s; its process was killed"
    }
    assert [n for _, n in calls(tmp_path)] == [3], "one timeout for the batch, not one per record"
    later = python_pipeline([{"x": 5}, {"x": 6}])
    assert [r.outputs for r in later if isinstance(r, Success)] == [{"y": 10.0}, {"y": 12.0}]


def test_crash_fails_only_the_record_that_crashes_it_and_later_batches_are_answered(
    python_pipeline: Callable[[list[object]], list[object]], tmp_path: Path
) -> None:
    results = python_pipeline([{"x": 1}, {"x": 99}, {"x": 3}, {"x": 4}])
    assert [r.reason for r in results if isinstance(r, Failure)] == [
        "step 1 (model 'prep' v1) failed: python step 'prep' process exited with code 7"
    ]
    assert [r.inputs for r in results if isinstance(r, Failure)] == [{"x": 99}]
    assert [r.outputs for r in results if isinstance(r, Success)] == [{"y": 2.0}, {"y": 6.0}, {"y": 8.0}]
    # Halves until the culprit is alone: the batch, its first half, each of that half's records, the rest.
    assert [n for _, n in calls(tmp_path)] == [4, 2, 1, 1, 2]
    later = python_pipeline([{"x": 5}])
    assert [r.outputs for r in later if isinstance(r, Success)] == [{"y": 10.0}]
