"""The end-to-end demo behind `make demo`.

Starts the local stack, trains and uploads two interchangeable classifiers, deploys a pipeline
in which the forest answers and the logistic regression shadows it, streams records through its
Kafka input topic and compares the two; then rolls out a new version that A/B-splits traffic 2:1
between them (sticky per customer) while the pipeline keeps serving, streams again, rolls back,
checks that every inference was logged; then watches petal length for drift with an assay:
interactively over what was logged, and live while drifted records stream in. It undeploys, then runs
the ML workloads example (examples/workloads: a Postgres source and sinks streaming rows of an external
database through a pipeline, and a nightly batch task scoring the same rows), and stops the stack.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

import joey
from joey_cli.stack import StackSettings, start_detached, stop_detached

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "workloads")]
from train_model import make_records, train_and_export  # noqa: E402
from wine_workload import run_workloads  # noqa: E402

RECORDS = 2000
PIPELINE = "iris-demo"
ASSAY = "petal-drift"
ASSAY_WINDOW_S = 10


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> None:
    # The demo's assay windows are seconds wide: the assayer waits 5 s for late records, not a minute.
    os.environ.setdefault("JOEY_ALLOWED_LATENESS_S", "5")
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
    step("training two classifiers on scikit-learn's iris data")
    forest_path = train_and_export(HERE / "model" / "iris.onnx")
    logreg_path = train_and_export(HERE / "model" / "iris-logreg.onnx", kind="logreg")

    client = joey.Client()
    step("uploading the models")
    forest = client.upload_model("iris", forest_path)
    logreg = client.upload_model("iris-logreg", logreg_path)
    for model in (forest, logreg):
        print(f"model {model.name} version {model.version}, sha256 {model.sha256[:16]}...")
    for spec in forest.inputs + forest.outputs:
        print(f"  {spec.name}: {spec.dtype} {list(spec.shape)}")

    step("deploying with 2 replicas: the forest answers, the logistic regression shadows it")
    pipeline = (
        client.build_pipeline(PIPELINE)
        .add_shadow_deploy(forest, [logreg])
        .add_validations(
            unsure="out.probabilities[0] < 0.6 and out.probabilities[1] < 0.6 and out.probabilities[2] < 0.6"
        )
    )
    status = pipeline.deploy(replicas=2, on_status=on_status)
    print(f"{status.status}: pipeline version {status.pipeline_version}")
    for replica in status.replicas:
        if replica.alive:
            print(f"  replica {replica.replica_id} holds partitions {list(replica.partitions)}")

    started = datetime.now(UTC)
    records: list = make_records(RECORDS)
    records[7] = {"features": [1.0, 2.0]}  # wrong shape: goes to the errors topic, the rest keep flowing
    results = stream(pipeline, records)
    first_stream_done = datetime.now(UTC)
    ok = results["error"].isna()
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        columns = ["in.features", "out.label", "shadow.iris-logreg.label", "anomaly.count"]
        print(results[columns][ok].head(5).to_string())
        print(results.loc[~ok, ["in.features", "error"]].to_string())
    agree = (results.loc[ok, "out.label"] == results.loc[ok, "shadow.iris-logreg.label"]).mean()
    print(
        f"the challenger agrees with the champion on {agree:.1%} of records; "
        f"{int(results.loc[ok, 'anomaly.count'].sum())} flagged unsure"
    )

    step("rolling out a new version while serving: an A/B split, forest 2 : 1 logistic regression")
    pipeline.clear().add_random_split([(2, forest), (1, logreg)], hash_key="customer")
    status = pipeline.deploy(replicas=2, on_status=on_status)
    print(f"{status.status}: pipeline version {status.pipeline_version}")
    customers = [
        {**record, "customer": f"c{i % 400}"} for i, record in enumerate(make_records(RECORDS, seed=1))
    ]
    results = stream(pipeline, customers)
    chosen = results["out._model_split"].map(lambda names: names[0] if isinstance(names, list) else names)
    print("records per model:", chosen.value_counts().to_dict())
    by_customer = chosen.groupby(results["in.customer"]).nunique()
    print(
        f"every one of {len(by_customer)} customers stayed with one model: {bool((by_customer == 1).all())}"
    )

    step("rolling back to the version deployed before (the shadowed one)")
    status = pipeline.rollback(on_status=on_status)
    print(f"{status.status}: pipeline version {status.pipeline_version}")

    step("waiting for the logger to record every inference")
    expected = 2 * RECORDS
    deadline = time.monotonic() + 60
    while (count := pipeline.log_count(start=started)) < expected and time.monotonic() < deadline:
        time.sleep(0.25)
    failures = pipeline.log_count(start=started, valid=False)
    print(f"{count} inferences logged for this run ({failures} failed)")
    if count != expected:
        raise SystemExit(f"expected {expected} logged inferences, found {count}")

    watch_drift(client, pipeline, started, first_stream_done)

    step("undeploying")
    pipeline.undeploy()
    print(pipeline.status().status)

    step("ML workloads: a streaming feed and a nightly batch task over an external Postgres store")
    with tempfile.TemporaryDirectory() as folder:
        run_workloads(client, Path(folder))


def watch_drift(
    client: joey.Client, pipeline: joey.Pipeline, baseline_start: datetime, baseline_end: datetime
) -> None:
    step("watching petal length (`input features 2`) for drift; baseline: the first stream's inferences")
    if any(a.name == ASSAY for a in client.list_assays()):
        client.delete_assay(ASSAY)  # from an earlier run of the demo

    def assay(start: datetime) -> joey.AssayBuilder:
        return (
            client.build_assay(
                ASSAY, PIPELINE, "input features 2", baseline_start=baseline_start, baseline_end=baseline_end
            )
            .add_width(seconds=ASSAY_WINDOW_S)
            .add_start(start)
            .add_warning_threshold(0.1)
        )

    baseline = assay(baseline_end).interactive_baseline_run()
    print(f"baseline of {baseline.count} values, mean {baseline.mean:.3f}, median {baseline.median:.3f}")
    print(baseline.to_dataframe().to_string(index=False))
    step("interactive run over what was logged since (the A/B split): no drift expected")
    since = assay(baseline_end).interactive_run()
    print(since.to_dataframe()[["window_start", "score", "status"]].to_string(index=False))

    step(f"uploading the assay: the assayer scores every {ASSAY_WINDOW_S} s window as it closes")
    live_start = datetime.now(UTC)
    assay(live_start).upload()
    drifted = make_records(RECORDS // 2, seed=2)
    for record in drifted:
        record["features"][2] += 1.5  # petal length drifts by 1.5 cm
    stream(pipeline, drifted)
    deadline = time.monotonic() + 90
    while not (live := client.get_assay_results(ASSAY)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not live:
        raise SystemExit("the assayer stored no result in 90 s")
    first = live[0]
    print(
        f"live window {first.window_start:%H:%M:%S}-{first.window_end:%H:%M:%S}: "
        f"{first.window_summary.count} values, PSI {first.score:.2f} -> {first.status}"
    )
    (replayed,) = assay(live_start).interactive_run(end=first.window_end)
    same = (replayed.score, replayed.window_summary) == (first.score, first.window_summary)
    print(f"the same window scored interactively from the logs gives the same result: {same}")


def on_status(status: joey.DeploymentStatus) -> None:
    print(f"  {status.status}: {status.message}")


def stream(pipeline: joey.Pipeline, records: list) -> pd.DataFrame:
    step(f"streaming {len(records)} records through topic {pipeline.topics.inputs}")
    t0 = time.perf_counter()
    results = pipeline.infer(records, timeout=120)
    elapsed = time.perf_counter() - t0
    ok = results["error"].isna()
    rate = len(results) / elapsed
    print(f"{int(ok.sum())} results and {int((~ok).sum())} errors in {elapsed:.2f}s ({rate:.0f} records/s)")
    return results


if __name__ == "__main__":
    main()
