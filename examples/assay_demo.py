"""Assays end to end: `python examples/assay_demo.py` (docs/assays.md).

Starts the local stack, deploys the iris classifier, streams a normal batch of records and then
a batch whose petal lengths drift, previews the baseline, scores the drifted period
interactively (writing baseline.png and scores.png), uploads the assay and waits for the live
assayer's first result, then cleans up and stops the stack.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

import joey
from joey_cli.stack import StackSettings, start_detached, stop_detached

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_model import train_and_export  # noqa: E402

PIPELINE = "iris-assayed"


def records(petal_lengths: np.ndarray) -> list[dict[str, list[float]]]:
    return [{"features": [5.8, 3.0, round(float(v), 3), 1.2]} for v in petal_lengths]


def wait_for(what: str, check: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def run_demo(out: Path) -> None:
    client = joey.Client()
    client.upload_model("iris", train_and_export(HERE / "model" / "iris.onnx"))
    pipeline = client.build_pipeline(PIPELINE).add_model_step("iris")
    pipeline.deploy(replicas=1)
    rng = np.random.default_rng(0)

    start = datetime.now(UTC)
    pipeline.infer(records(rng.normal(4.0, 1.0, 500)))
    middle = datetime.now(UTC)
    pipeline.infer(records(rng.normal(5.2, 0.8, 500)))
    wait_for("the inferences to be logged", lambda: pipeline.log_count(start=start) >= 1000)
    width = math.ceil((datetime.now(UTC) - middle).total_seconds()) + 1
    wait_for("the window to end", lambda: datetime.now(UTC) > middle + timedelta(seconds=width))

    assay = (
        client.build_assay(
            "petal-drift", pipeline, "input features 2", baseline_start=start, baseline_end=middle
        )
        .add_width(seconds=width)
        .add_start(middle)
        .add_warning_threshold(0.1)
    )
    baseline = assay.interactive_baseline_run()
    print(baseline.to_dataframe().to_string(index=False))
    print("baseline chart:", baseline.chart(out / "baseline.png"))
    results = assay.interactive_run()
    print(results.to_dataframe()[["window_start", "score", "status"]].to_string(index=False))
    print("scores chart:", results.chart_scores(out / "scores.png"))

    assay.upload()
    # The window has closed; the assayer stores it after the allowed lateness (60 s by default).
    wait_for("the live result", lambda: len(client.get_assay_results("petal-drift")) > 0, timeout=180)
    live = client.get_assay_results("petal-drift")[0]
    print(f"live result: score {live.score:.6f} ({live.status}), interactive {results[0].score:.6f}")
    client.delete_assay("petal-drift")
    pipeline.undeploy()


def main() -> None:
    settings = StackSettings()
    start_detached(settings)
    try:
        run_demo(Path.cwd())
    finally:
        stop_detached(settings)


if __name__ == "__main__":
    main()
