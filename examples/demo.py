"""The end-to-end demo behind `make demo`.

Starts the local stack, trains and uploads the example model, deploys a pipeline with two
replicas, streams records through its Kafka input topic, prints a few results and the
number of logged inferences, undeploys, and stops the stack.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

import joey
from joey.stack import StackSettings, start_detached, stop_detached

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_model import make_records, train_and_export  # noqa: E402

RECORDS = 2000
PIPELINE = "iris-demo"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> None:
    settings = StackSettings()
    step("starting the local stack (`joey up --detach`)")
    state = start_detached(settings)
    print(f"registry {state['registry_addr']}, Kafka {state['kafka_bootstrap']}")
    try:
        run_demo()
    finally:
        step("stopping the stack (`joey down`)")
        print("stopped" if stop_detached(settings) else "the stack was not running")


def run_demo() -> None:
    step("training the example classifier on scikit-learn's iris data")
    model_path = train_and_export(HERE / "model" / "iris.onnx")

    client = joey.Client()
    step("uploading the model")
    model = client.upload_model("iris", model_path)
    print(f"model {model.name} version {model.version}, sha256 {model.sha256[:16]}...")
    for spec in model.inputs + model.outputs:
        print(f"  {spec.name}: {spec.dtype} {list(spec.shape)}")

    step("building and deploying the pipeline with 2 replicas")
    pipeline = client.build_pipeline(PIPELINE).add_model_step(model)
    status = pipeline.deploy(replicas=2, on_status=lambda st: print(f"  {st.status}: {st.message}"))
    print(f"{status.status}: pipeline version {status.pipeline_version}")
    for replica in status.replicas:
        if replica.alive:
            print(f"  replica {replica.replica_id} holds partitions {list(replica.partitions)}")

    started = datetime.now(UTC)
    records: list = make_records(RECORDS)
    records[7] = {"features": [1.0, 2.0]}  # wrong shape: goes to the errors topic, the rest keep flowing
    step(f"streaming {RECORDS} records through topic {pipeline.topics.inputs}")
    t0 = time.perf_counter()
    results = pipeline.infer(records, timeout=120)
    elapsed = time.perf_counter() - t0
    ok = results["error"].isna()
    rate = len(results) / elapsed
    print(f"{int(ok.sum())} results and {int((~ok).sum())} errors in {elapsed:.2f}s ({rate:.0f} records/s)")
    with pd.option_context("display.width", 160, "display.max_colwidth", 48):
        print(results[["time", "in.features", "out.label", "out.probabilities"]][ok].head(5).to_string())
        print(results.loc[~ok, ["in.features", "error"]].to_string())

    step("waiting for the logger to record every inference")
    deadline = time.monotonic() + 60
    while (count := pipeline.log_count(start=started)) < RECORDS and time.monotonic() < deadline:
        time.sleep(0.25)
    failures = pipeline.log_count(start=started, valid=False)
    print(f"{count} inferences logged for this run ({failures} failed)")
    if count != RECORDS:
        raise SystemExit(f"expected {RECORDS} logged inferences, found {count}")

    step("undeploying")
    pipeline.undeploy()
    print(pipeline.status().status)


if __name__ == "__main__":
    main()
