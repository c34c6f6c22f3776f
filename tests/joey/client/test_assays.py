"""Assays through the SDK against the running stack, over inferences of a deployed iris pipeline."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from joey.client import Client, JoeyError
from joey_cli import main
from joey_core import assays
from joey_core.settings import CommonSettings
from tests.conftest import Stack, wait_until

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def client(stack: Stack, settings: CommonSettings) -> Client:
    client = Client(settings=settings, workspace=f"ws-{secrets.token_hex(4)}")
    client.create_workspace(client.workspace)
    return client


def records(petal_lengths: np.ndarray) -> list[dict[str, list[float]]]:
    return [{"features": [5.0, 3.2, float(v), 1.1]} for v in petal_lengths]


def test_interactive_runs_over_real_inferences(client: Client, iris_model: Path, tmp_path: Path) -> None:
    client.upload_model("iris", iris_model)
    pipeline = client.build_pipeline("assayed").add_model_step("iris")
    pipeline.deploy(replicas=1, timeout=90)
    rng = np.random.default_rng(3)
    baseline = np.round(rng.normal(4.0, 1.0, 120), 3)
    drifted = np.round(rng.normal(5.5, 0.8, 90), 3)

    before = datetime.now(UTC)
    pipeline.infer(records(baseline))
    middle = datetime.now(UTC)
    pipeline.infer(records(drifted))
    wait_until(lambda: pipeline.log_count() == 210, 60, "all 210 inferences logged")
    after = datetime.now(UTC)
    width = math.ceil((after - middle).total_seconds()) + 1
    # The one window [middle, middle + width) must have ended before the run.
    wait_until(lambda: datetime.now(UTC) >= middle + timedelta(seconds=width), width + 5, "window end")

    assay = (
        client.build_assay(
            "petal-drift", pipeline, "input features 2", baseline_start=before, baseline_end=middle
        )
        .add_width(seconds=width)
        .add_start(middle)
        .add_num_bins(4)
        .add_warning_threshold(0.1)
        .add_alert_threshold(0.5)
    )
    preview = assay.interactive_baseline_run()
    expected_baseline = assays.baseline_summary(baseline, num_bins=4)
    assert preview.count == 120 and list(preview.bin_counts) == list(expected_baseline.bin_counts)
    assert preview.edges == expected_baseline.edges
    assert preview.chart(tmp_path / "baseline.png").read_bytes().startswith(PNG)
    assert list(preview.to_dataframe()["bin"]) == list(expected_baseline.edge_names)

    # Up to the window's end: a run up to now would also show the window open since then.
    window_end = middle + timedelta(seconds=width)
    results = assay.interactive_run(end=window_end)
    (result,) = results
    expected = assays.score(baseline, drifted, num_bins=4, alert_threshold=0.5, warning_threshold=0.1)
    assert result.score == expected.score and result.scores == expected.scores
    assert result.status == str(expected.status) == "Alert"
    assert result.window_summary.bin_counts == expected.window_summary.bin_counts
    assert result.window_summary.median == expected.window_summary.median
    assert result.window_summary.mean == pytest.approx(expected.window_summary.mean, rel=1e-12)
    frame = results.to_dataframe()
    assert list(frame["score"]) == [expected.score] and list(frame["status"]) == ["Alert"]
    assert results.chart_scores(tmp_path / "scores.png").read_bytes().startswith(PNG)

    # Outputs too: the probability of class 2 per record.
    by_output = (
        client.build_assay(
            "p2", pipeline, "output probabilities 2", baseline_start=before, baseline_end=middle
        )
        .add_width(seconds=width)
        .add_start(middle)
    )
    assert by_output.interactive_baseline_run().count == 120
    assert len(by_output.interactive_run(end=window_end)) == 1

    # Up to now: the closed window, then the one open since (empty: nothing was inferred after).
    up_to_now = assay.interactive_run()
    assert [r.status for r in up_to_now] == ["Alert", "Open"]
    still_open = up_to_now[-1]
    assert still_open.window_summary.count == 0 and still_open.window_end > datetime.now(UTC)
    assert up_to_now.to_dataframe()["status"].tolist() == ["Alert", "Open"]
    assert up_to_now.title == (
        "petal-drift · input features 2\n1 window scored, 90 values (90 each); open: 0 so far"
    )
    (note,) = up_to_now.notes()
    opened = still_open.window_start.isoformat()
    assert note.startswith(f"window {opened} is open: 0 values so far, closes at")
    assert up_to_now.chart_scores(tmp_path / "open.png").read_bytes().startswith(PNG)
    # With a min_count above the window's 90 values, it is NoData: charted, titled, not judged.
    small = assay.add_min_count(100).interactive_run(end=window_end)
    assert [r.status for r in small] == ["NoData"] and small[0].score == expected.score
    assert small.title == "petal-drift · input features 2\nno window scored; 1 window NoData (< 100 values)"
    assert small.notes()[0].startswith("1 of 1 windows hold fewer than 100 values (min_count): NoData")
    assert small.chart_scores(tmp_path / "small.png").read_bytes().startswith(PNG)
    # Up to now, the open window is not among the closed windows the note counts.
    small_then_open = assay.interactive_run()
    assert [r.status for r in small_then_open] == ["NoData", "Open"]
    assert small_then_open.notes()[0].startswith("1 of 1 windows hold fewer than 100 values (min_count)")
    assay.add_min_count(30)
    # An end inside the window, long closed since: the window is named, not dropped silently.
    cut = assay.interactive_run(end=middle + timedelta(seconds=1))
    assert not cut and cut.cut == (middle, window_end)
    assert cut.notes() == [
        f"window {middle.isoformat()} to {window_end.isoformat()} extends past end: not shown"
    ]

    # Baselines by rows of the log: every row of a batch shares its time, so only rows can pick
    # the first 120 inferences (the baseline batch) or the last 90 (the drifted one).
    by_rows = client.build_assay("rows", pipeline, "input features 2").add_num_bins(4)
    first = by_rows.baseline_first(120).interactive_baseline_run()
    assert (first.count, first.bin_counts) == (120, expected_baseline.bin_counts)
    last = by_rows.baseline_last(90).interactive_baseline_run()
    assert (last.count, last.mean) == (90, pytest.approx(float(np.mean(drifted)), rel=1e-12))
    ranged = by_rows.baseline_rows(100, 130).interactive_baseline_run()
    assert ranged.count == 30
    with pytest.raises(JoeyError) as too_many:
        by_rows.baseline_first(1000).interactive_baseline_run()
    assert "hold only 210 values" in too_many.value.message

    uploaded = assay.upload()
    assert uploaded.active and uploaded.baseline.bin_counts == preview.bin_counts
    assert [a.name for a in client.list_assays()] == ["petal-drift"]
    assert not client.pause_assay("petal-drift").active
    assert client.get_assay("petal-drift").resume().active
    assert client.get_assay_results("petal-drift") == []
    with pytest.raises(JoeyError) as taken:
        assay.upload()
    assert taken.value.code == "ALREADY_EXISTS"
    client.delete_assay("petal-drift")
    assert client.list_assays() == []
    pipeline.undeploy()


def test_bad_definition_is_refused_with_the_reason(client: Client, iris_model: Path) -> None:
    client.upload_model("iris", iris_model)
    client.build_pipeline("p").add_model_step("iris").create()
    builder = client.build_assay("a", "p", "input features 9", baseline_data=[1.0, 2.0, 3.0])
    with pytest.raises(JoeyError) as error:
        builder.upload()
    assert error.value.code == "INVALID_ARGUMENT" and "out of range" in error.value.message
    builder = client.build_assay("a", "p", "input features 1", baseline_data=[1.0, 2.0]).add_bin_weights(
        [1, 2]
    )
    with pytest.raises(JoeyError) as weights:
        builder.upload()
    assert "expected 7, got 2" in weights.value.message
    with pytest.raises(ValueError, match="whole seconds"):
        builder.add_width(seconds=0.5)
    with pytest.raises(ValueError, match=r"^baseline_first needs N >= 1, got 0$"):
        builder.baseline_first(0)
    with pytest.raises(ValueError, match=r"^baseline_last needs N >= 1, got -3$"):
        builder.baseline_last(-3)
    with pytest.raises(ValueError, match=r"^baseline_rows needs 0 <= start < stop, got start 5, stop 5$"):
        builder.baseline_rows(5, 5)
    assert client.list_assays() == []


def test_cli_assay_commands(
    client: Client, iris_model: Path, settings: CommonSettings, tmp_path: Path
) -> None:
    client.upload_model("iris", iris_model)
    pipeline = client.build_pipeline("cli-p").add_model_step("iris")
    pipeline.deploy(replicas=1, timeout=90)
    before = datetime.now(UTC)
    pipeline.infer(records(np.linspace(1.0, 6.0, 40)))
    wait_until(lambda: pipeline.log_count() == 40, 60, "40 inferences logged")
    wait_until(lambda: datetime.now(UTC) >= before + timedelta(seconds=3), 5, "the window end")
    pipeline.undeploy()
    runner = CliRunner()
    base = ["--registry", settings.registry_addr, "-w", client.workspace, "assay"]
    definition = [
        "-p",
        "cli-p",
        "--iopath",
        "input features 2",
        "--width",
        "2",
        "--start",
        before.isoformat(),
    ]
    baseline = tmp_path / "baseline.txt"
    baseline.write_text("\n".join(str(v) for v in np.linspace(1.0, 6.0, 40)))
    definition += ["--baseline-file", str(baseline), "--metric", "sumdiff"]

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(main, [*base, *args])
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    preview = run("preview", "a", *definition, "--chart", str(tmp_path / "b.png"))
    assert "count 40" in preview and "left_outlier" in preview
    assert (tmp_path / "b.png").read_bytes().startswith(PNG)
    assert "left_outlier" not in run("preview", "a", *definition, "--no-outlier-bins")
    ran = run("run", "a", *definition, "--chart", str(tmp_path / "s.png"))
    assert "sumdiff" in ran and (tmp_path / "s.png").read_bytes().startswith(PNG)
    assert "a\tcli-p\tinput features 2\tactive" in run("create", "a", *definition)
    assert "a\tcli-p" in run("list")
    assert "paused" in run("pause", "a") and "paused" in run("get", "a")
    assert "active" in run("resume", "a")
    assert "no results" in run("results", "a", "--start", "2020-01-01T00:00:00+00:00")
    bad = run("create", "b", *definition[:3], "input nothing 0", *definition[4:], ok=False)
    assert "no input field 'nothing'" in bad
    assert "deleted assay a" in run("delete", "a")
    assert "no assays" in run("list")
