"""A client's connection to a deployed pipeline, kept across calls: one producer and one reply reader per
pipeline, shared by threads, replaced when it stopped, closed with the client; the deployment status
asked once per ``status_cache_s``, not on every call."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from joey.client import Client, JoeyError, Pipeline
from joey.client.pipelines import INFER_CHUNK_ROWS
from joey_core import kafka, topics
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import Stack, wait_until
from train_model import make_records

PIPELINE = "client-streams"


class CountingClient(Client):
    """A client that counts its registry calls by name (the registry itself answers them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def call(self, name: str, request: Any, timeout: float = 60.0, *, anonymous: bool = False) -> Any:
        self.calls[name] += 1
        return super().call(name, request, timeout, anonymous=anonymous)


@pytest.fixture(scope="module")
def deployed(stack: Stack, settings: CommonSettings, iris_model: Path) -> Iterator[Pipeline]:
    with Client(settings=settings) as client:
        model = client.upload_model(PIPELINE, iris_model)
        pipeline = client.build_pipeline(PIPELINE).add_model_step(model)
        pipeline.deploy(replicas=1, timeout=90)
        yield pipeline
        if pipeline.status().deployed:
            pipeline.undeploy()


def features(frame: pd.DataFrame) -> list[list[float]]:
    return [list(row) for row in frame["in.features"]]


def test_sequential_infers_reuse_one_producer_and_one_reader_and_ask_the_status_once(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    with CountingClient(settings=settings, status_cache_s=600) as client:
        pipeline = client.get_pipeline(PIPELINE)
        first = pipeline.infer(make_records(1, seed=1))
        stream = client.streams.stream(pipeline.topics)
        reader, producer = stream.reader, stream.producer
        for seed in range(2, 12):
            records = make_records(1, seed=seed)
            result = pipeline.infer(records)
            assert result["error"].isna().all(), result["error"].tolist()
            assert features(result) == [r["features"] for r in records]
        again = client.streams.stream(pipeline.topics)
        assert (again, again.reader, again.producer) == (stream, reader, producer)
        assert first["error"].isna().all()
        assert client.calls["GetDeploymentStatus"] == 1, client.calls


def test_threads_inferring_at_once_on_one_client_each_get_their_own_replies(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    with Client(settings=settings) as client:
        pipeline = client.get_pipeline(PIPELINE)
        sent = {n: make_records(5, seed=100 + n) for n in range(8)}
        got: dict[int, list[list[float]]] = {}
        failures: list[BaseException] = []

        def infer(n: int) -> None:
            try:
                got[n] = features(pipeline.infer(sent[n], timeout=60))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=infer, args=(n,)) for n in sent]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        assert got == {n: [r["features"] for r in records] for n, records in sent.items()}


def test_a_stream_whose_reader_stopped_is_replaced_on_the_next_call(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    with Client(settings=settings) as client:
        pipeline = client.get_pipeline(PIPELINE)
        pipeline.infer(make_records(1, seed=20))
        stopped = client.streams.stream(pipeline.topics)
        stopped.reader.close()  # its thread ends, as it would on a fatal consumer error
        assert not stopped.alive
        records = make_records(2, seed=21)
        result = pipeline.infer(records)
        assert features(result) == [r["features"] for r in records]
        assert client.streams.stream(pipeline.topics) is not stopped


def test_a_closed_client_closes_its_streams_closes_again_and_refuses_to_infer(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    with Client(settings=settings) as client:
        pipeline = client.get_pipeline(PIPELINE)
        pipeline.infer(make_records(1, seed=30))
        stream = client.streams.stream(pipeline.topics)
    assert not stream.alive
    client.close()
    with pytest.raises(JoeyError, match="client is closed") as info:
        pipeline.infer(make_records(1, seed=31))
    assert info.value.code == "FAILED_PRECONDITION"


def test_an_interpreter_that_exits_with_its_client_open_exits(
    deployed: Pipeline, env: dict[str, str]
) -> None:
    # The client's streams (reader and poller threads, librdkafka's own) are closed at exit, not left
    # to hold the interpreter or to be torn down half-way.
    script = f"""
import joey
client = joey.Client()
pipeline = client.get_pipeline({PIPELINE!r})
assert pipeline.infer([{{"features": [5.1, 3.5, 1.4, 0.2]}}])["error"].isna().all()
print("open:", client.streams.stream(pipeline.topics).alive)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "open: True"


def test_rows_of_several_chunks_stream_back_in_order_with_progress(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    rows = 2 * INFER_CHUNK_ROWS + 2_000  # the last chunk a part one
    values = np.random.default_rng(40).normal(5, 1, (rows, 4)).round(3)
    # Four numeric columns, packed into the model's "features" input, a chunk at a time.
    frame = pd.DataFrame(values, columns=["a", "b", "c", "d"])
    seen: list[tuple[int, int]] = []
    with Client(settings=settings) as client:
        result = client.get_pipeline(PIPELINE).infer(frame, timeout=120, progress=lambda *p: seen.append(p))
    assert len(result) == rows
    assert result["error"].isna().all()
    assert features(result) == values.tolist()
    assert seen[-1] == (rows, rows)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_undeploy_and_deploy_again_from_the_client_are_seen_at_once(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    with Client(settings=settings, status_cache_s=600) as client:
        pipeline = client.get_pipeline(PIPELINE)
        pipeline.infer(make_records(1, seed=50))
        pipeline.undeploy()
        with pytest.raises(JoeyError, match="is not deployed"):
            pipeline.infer(make_records(1, seed=51))
        pipeline.deploy(replicas=1, timeout=90)
        records = make_records(3, seed=52)
        result = pipeline.infer(records, timeout=60)
        assert result["error"].isna().all(), result["error"].tolist()
        assert features(result) == [r["features"] for r in records]


class OrderClient(Client):
    """A client noting, as each DeletePipeline leaves for the registry, whether a stream of that
    pipeline was still open (closing it then, so that a failure of this test cannot crash pytest)."""

    open_at_delete: list[bool]

    def _call(self, fn: Any, request: Any, timeout: float, anonymous: bool = False) -> Any:
        if isinstance(request, pb.DeletePipelineRequest):
            held = self.streams._streams.get(topics.pipeline_topics(request.workspace, request.name))  # noqa: SLF001
            self.open_at_delete.append(held is not None and held.alive)
            if held is not None:
                held.close()
        return super()._call(fn, request, timeout, anonymous)


def test_a_pipeline_deleted_from_its_client_loses_its_stream_before_the_registry_deletes_its_topics(
    deployed: Pipeline, settings: CommonSettings
) -> None:
    # A reader assigned to topics while they are deleted can crash the process (librdkafka, see
    # docs/reliability.md): the client lets go of them first.
    name = f"deleted-{secrets.token_hex(3)}"
    with OrderClient(settings=settings) as client:
        client.open_at_delete = []
        pipeline = client.build_pipeline(name).add_model_step(PIPELINE)  # the model of ``deployed``
        pipeline.create()
        kafka.ensure_topics(
            kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, "default", name)
        )
        stream = client.streams.stream(pipeline.topics)
        pipeline.delete()
        assert client.open_at_delete == [False]
        assert not stream.alive


def test_a_workspace_deleted_from_the_client_loses_its_streams_and_statuses_first(
    stack: Stack, settings: CommonSettings
) -> None:
    workspace = f"gone-{secrets.token_hex(3)}"
    kept = topics.pipeline_topics("default", f"{workspace}-kept")
    admin = kafka.admin_client(settings)
    for ws, name in ((workspace, "a"), (workspace, "b"), ("default", f"{workspace}-kept")):
        kafka.ensure_topics(admin, kafka.pipeline_topic_specs(settings, ws, name))
    with Client(settings=settings) as client:
        streams = [client.streams.stream(topics.pipeline_topics(workspace, n)) for n in ("a", "b")]
        other = client.streams.stream(kept)
        client.streams.status((workspace, "a"), lambda: "deployed", keep=lambda _: True)
        client.streams.before_call("DeleteWorkspace", pb.DeleteWorkspaceRequest(name=workspace))
        assert [s.alive for s in streams] == [False, False]
        assert other.alive and client.streams.stream(kept) is other
        assert (
            client.streams.status((workspace, "a"), lambda: "asked again", keep=lambda _: True)
            == "asked again"
        )


def test_a_stream_idle_for_stream_idle_s_is_closed_and_the_next_call_opens_another(
    stack: Stack, settings: CommonSettings
) -> None:
    name = f"idle-{secrets.token_hex(3)}"
    names = topics.pipeline_topics("default", name)
    kafka.ensure_topics(kafka.admin_client(settings), kafka.pipeline_topic_specs(settings, "default", name))
    with Client(settings=settings.model_copy(update={"stream_idle_s": 0.2})) as client:
        stream = client.streams.stream(names)
        wait_until(lambda: not stream.alive, 30, "the idle stream to close")
        again = client.streams.stream(names)
        assert again is not stream and again.alive
