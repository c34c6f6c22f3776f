"""What a python step costs in the engine, against the same code called in-process, in one run.

Three pipelines run the same records through the engine's PipelineRunner (no Kafka: this measures
the step, not the transport), batch by batch:

* ``iris``: the ONNX model alone, fed ``features`` vectors;
* ``python step``: examples/steps/iris_preprocess.py as a python step (sandbox process, arrays over
  a pipe) turning four fields into ``features``, then iris;
* ``user code``: not a pipeline, the same ``process_data`` called in-process on the batch's columns:
  what the user's numpy code itself costs.

``python step`` - ``iris`` - ``user code`` is the isolation's price per batch.

    python bench/python_step_overhead.py --batches 300
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from joey_core.v1 import registry_pb2 as pb  # noqa: E402
from joey_engine.deployment import from_proto  # noqa: E402
from joey_engine.replica import load_runner  # noqa: E402
from joey_engine.settings import EngineSettings  # noqa: E402
from train_model import make_records, train_and_export  # noqa: E402

PREP = ROOT / "examples" / "steps" / "iris_preprocess.py"
FIELDS = ("sepal_length_mm", "sepal_width_mm", "petal_length_mm", "petal_width_mm")


def spec(steps: list[pb.ResolvedStep]) -> pb.DeploymentSpec:
    return pb.DeploymentSpec(
        workspace="bench", pipeline="py", pipeline_version=1, deployment_id="bench", steps=steps
    )


def iris_step() -> pb.ResolvedStep:
    return pb.ResolvedStep(
        model="iris",
        version=1,
        sha256="0" * 64,
        framework="onnx",
        inputs=[pb.TensorSpec(name="features", dtype="float32", shape=[-1, 4])],
        outputs=[
            pb.TensorSpec(name="label", dtype="int64", shape=[-1]),
            pb.TensorSpec(name="probabilities", dtype="float32", shape=[-1, 3]),
        ],
    )


def prep_step() -> pb.ResolvedStep:
    return pb.ResolvedStep(
        model="prep",
        version=1,
        sha256="1" * 64,
        framework="python",
        inputs=[pb.TensorSpec(name=name, dtype="float64", shape=[-1]) for name in FIELDS],
        outputs=[pb.TensorSpec(name="features", dtype="float32", shape=[-1, 4])],
    )


def timed(run: Callable[[], object], batches: int) -> list[float]:
    run()  # warm-up
    seconds = []
    for _ in range(batches):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300, help="batches timed per pipeline and size")
    parser.add_argument("--sizes", default="1,16,256", help="batch sizes (records)")
    args = parser.parse_args()
    settings = EngineSettings(instance_id="bench")
    with tempfile.TemporaryDirectory() as tmp:
        model = train_and_export(Path(tmp) / "iris.onnx")
        iris = load_runner(settings, from_proto(spec([iris_step()])), [model])
        sandboxed = load_runner(settings, from_proto(spec([prep_step(), iris_step()])), [PREP, model])
        module_spec = importlib.util.spec_from_file_location("prep", PREP)
        assert module_spec is not None and module_spec.loader is not None
        prep = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(prep)

        print(f"{'pipeline':<14}{'batch':>7}{'p50 ms':>10}{'p99 ms':>10}{'records/s':>12}")
        for size in (int(s) for s in args.sizes.split(",")):
            records = make_records(size, seed=size)
            iris_values = [json.dumps(r).encode() for r in records]
            rows = [{f: v * 10 for f, v in zip(FIELDS, r["features"], strict=True)} for r in records]
            prep_values = [json.dumps(r).encode() for r in rows]
            columns = {f: np.asarray([r[f] for r in rows]) for f in FIELDS}

            runs: list[tuple[str, Callable[[], object]]] = [
                ("iris", partial(iris.run, iris_values)),
                ("python step", partial(sandboxed.run, prep_values)),
                ("user code", partial(prep.process_data, columns)),
            ]
            for name, run in runs:
                seconds = timed(run, args.batches)
                p50 = statistics.median(seconds)
                p99 = statistics.quantiles(seconds, n=100)[98]
                print(f"{name:<14}{size:>7}{p50 * 1e3:>10.2f}{p99 * 1e3:>10.2f}{size / p50:>12.0f}")


if __name__ == "__main__":
    main()
