"""What a split step costs the engine's batch path, against a plain model step in the same run.

Every variant runs the example classifier (examples/train_model.py) in-process through
``PipelineRunner.run`` on the same batches of raw JSON records; a split's arms are that same model
uploaded under two names, so the difference is the split itself: choosing each record's arm
(random, by a hash of a record field, or by a record field's value), running one sub-batch per arm
and scattering the outputs back, and the chosen model in each result.

    python bench/split_overhead.py --batch 500 --batches 200 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE.parent / "services" / "engine"))

from joey_core.v1 import registry_pb2  # noqa: E402
from joey_engine.deployment import from_proto  # noqa: E402
from joey_engine.pipeline import PipelineRunner  # noqa: E402
from joey_engine.runtime import OnnxRuntime  # noqa: E402
from joey_engine.settings import EngineSettings  # noqa: E402
from train_model import make_records, train_and_export  # noqa: E402

INPUTS = [registry_pb2.TensorSpec(name="features", dtype="float32", shape=[-1, 4])]
OUTPUTS = [
    registry_pb2.TensorSpec(name="label", dtype="int64", shape=[-1]),
    registry_pb2.TensorSpec(name="probabilities", dtype="float32", shape=[-1, 3]),
]


def model(name: str) -> registry_pb2.ResolvedStep:
    return registry_pb2.ResolvedStep(
        model=name, version=1, sha256="0" * 64, framework="onnx", inputs=INPUTS, outputs=OUTPUTS
    )


VARIANTS = {
    "model step (baseline)": model("a"),
    "random split 2:1": registry_pb2.ResolvedStep(arms=[model("a"), model("b")], weights=[2, 1]),
    "random split, hash key": registry_pb2.ResolvedStep(
        arms=[model("a"), model("b")], weights=[2, 1], hash_key="user"
    ),
    "key split": registry_pb2.ResolvedStep(
        arms=[model("a"), model("b")], meta_key="tier", routes={"gold": "b"}
    ),
}


def runner(step: registry_pb2.ResolvedStep, path: Path) -> PipelineRunner:
    spec = registry_pb2.DeploymentSpec(
        workspace="bench", pipeline="split", pipeline_version=1, deployment_id="bench", steps=[step]
    )
    deployment = from_proto(spec)
    runtimes = []
    for _ in deployment.artifact_steps:
        runtime = OnnxRuntime(EngineSettings(instance_id="bench"))
        runtime.load(path)
        runtimes.append(runtime)
    return PipelineRunner(deployment, runtimes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=500, help="records per batch")
    parser.add_argument("--batches", type=int, default=200, help="batches per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per variant (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = train_and_export(Path(tmp) / "iris.onnx")
        records = make_records(args.batch, seed=1)
        for i, record in enumerate(records):
            record["user"] = f"user-{i % 97}"  # type: ignore[assignment]
            record["tier"] = "gold" if i % 3 == 0 else "silver"  # type: ignore[assignment]
        batch = [json.dumps(r).encode() for r in records]
        runners = {name: runner(step, path) for name, step in VARIANTS.items()}
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            # Variants take turns, so none gains from running first or on a warmer machine.
            for name, run in runners.items():
                run.run(batch)  # warm up
                start = time.perf_counter()
                for _ in range(args.batches):
                    run.run(batch)
                rates[name].append(args.batch * args.batches / (time.perf_counter() - start))

    baseline = statistics.median(rates["model step (baseline)"])
    print(f"\n{args.batches} batches of {args.batch} records, median of {args.repeats} runs\n")
    print("| variant | records/s | vs baseline |")
    print("|---|---:|---:|")
    for name, measured in rates.items():
        rate = statistics.median(measured)
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
