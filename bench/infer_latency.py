"""Latency of single-row inference through every door of Joey, next to the broker's own floor, in one run.

One stack: the embedded broker, `joey serve registry`, `joey serve engine` (one replica) and
`joey serve gateway`, the iris example pipeline deployed with the SDK. One call at a time, at a
steady ``--rate`` per second, for ``--seconds`` per system and repetition; the systems take
turns, repetition by repetition:

* broker: a bare produce -> consume of one small record on that broker (the gateway's producer
  settings, Joey's assign-only reply reader): the floor of any Kafka hop here.
* echo: produce -> bench/echo.py (the engine's Kafka loop and batching, no model, in its own
  process) -> the reply read back: the floor of any request/reply pipeline on this broker.
* sdk: ``pipeline.infer([one_row])`` on one long-lived ``joey.Client``.
* oip-rest, oip-grpc: tritonclient.http / tritonclient.grpc -> gateway -> Kafka -> engine
  replica -> Kafka -> gateway.
* wallaroo-rest: ``POST /pipelines/<workspace>/<pipeline>/infer`` on the gateway's HTTP port,
  pandas-records JSON, bearer token.
* direct: onnxruntime.InferenceSession.run on the same model, in this process (1 intra-op
  thread, as the engine's replicas use).
* sdk-bulk: ``pipeline.infer`` of ``--bulk-rows`` rows once per repetition: records/s and the
  peak resident memory the call added to this process.

Latency is the client's wall time per call; every model system's labels are checked against
onnxruntime during the warm-up. A system whose call fails (an HTTP error, a timeout) is
reported with its error in its row and the others go on. A call slower than the interval
delays the next one, so the rate is a ceiling (the table reports what was achieved).

    python bench/infer_latency.py --rate 50 --seconds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from joey.client import Client, Pipeline
from joey_cli.broker import EmbeddedBroker
from joey_core import heartbeats
from joey_core.kafka import admin_client, ensure_topics, pipeline_topic_specs
from joey_core.settings import CommonSettings
from joey_core.topics import pipeline_topics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_throughput import (  # noqa: E402
    REDIS_URL,
    WORKSPACE,
    Process,
    admin_token,
    free_port,
    interrupt,
    registry_ready,
    scratch_database,
    scratch_redis_prefix,
    stack_secrets,
    wait_until,
)
from measure import RoundTrip, paced  # noqa: E402

from train_model import make_records, train_and_export  # noqa: E402

PIPELINE = "bench-latency"
WARMUP_CALLS = 50
WARMUP_SECONDS = 5.0
"""A warm-up stops after this long even short of WARMUP_CALLS: a slow system still gets a few calls."""
LATENCY_SYSTEMS = ("broker", "echo", "sdk", "oip-rest", "oip-grpc", "wallaroo-rest", "direct")
BULK = "sdk-bulk"
FLOORS = ("broker", "echo")

Call = Callable[[], list[int] | None]
"""One call of a system: the labels it returned (None for the floors, which run no model)."""


class Bearer(grpcclient.InferenceServerClientPlugin):
    """Presents the bench's token to the gateway on every tritonclient call."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def __call__(self, request: object) -> None:
        request.headers["authorization"] = self._header  # type: ignore[attr-defined]


class WallarooRest:
    """The Wallaroo-style endpoint over one keep-alive connection (http.client sends headers and body
    in one segment, so Nagle's algorithm does not hold the body back).

    The gateway closes a connection idle for JOEY_HEADER_TIMEOUT_S, and the other systems' turns last
    longer: after a pause the connection is opened anew (on the first call, as any HTTP client would),
    rather than writing to one the server may have closed.
    """

    IDLE_S = 1.0

    def __init__(self, addr: str, token: str, rows: list[dict[str, Any]]) -> None:
        host, port = addr.rsplit(":", 1)
        self._connection = http.client.HTTPConnection(host, int(port), timeout=30)
        self._path = f"/pipelines/{WORKSPACE}/{PIPELINE}/infer"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._body = json.dumps(rows).encode()
        self._used_at = 0.0

    def __call__(self) -> list[int]:
        if time.monotonic() - self._used_at > self.IDLE_S:
            self._connection.close()  # http.client connects again on the request
        self._used_at = time.monotonic()
        self._connection.request("POST", self._path, self._body, self._headers)
        response = self._connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(
                f"HTTP {response.status} {response.reason}: {body[:200].decode(errors='replace')}"
            )
        return [int(label) for row in json.loads(body) for label in np.ravel(row_label(row))]

    def close(self) -> None:
        self._connection.close()


def row_label(row: dict[str, Any]) -> Any:
    """A result row's label; the row's own error when it failed (rows as the SDK's frame has them)."""
    if row.get("error"):
        raise RuntimeError(f"a row failed: {row['error']}")
    return row["out.label"]


@dataclass
class Result:
    """One system's measurements across the repetitions."""

    latencies_ms: list[float] = field(default_factory=list)
    rep_p50_ms: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    error: str | None = None
    bulk_records_per_s: list[float] = field(default_factory=list)
    bulk_rss_growth_mb: list[float] = field(default_factory=list)


def check_labels(name: str, got: list[int] | None, expected: list[int]) -> None:
    if got is not None and got != expected:
        raise RuntimeError(f"{name} disagrees with onnxruntime on the labels: {got} != {expected}")


def warm_up(name: str, call: Call, expected: list[int]) -> None:
    deadline = time.monotonic() + WARMUP_SECONDS
    for _ in range(WARMUP_CALLS):
        check_labels(name, call(), expected)
        if time.monotonic() > deadline:
            break


def rss_peak_reset() -> int:
    """This process's resident memory now (bytes), after resetting its peak (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS") * 1024


def status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise LookupError(f"{field_name} not in /proc/self/status")


def bulk(pipeline: Pipeline, rows: list[dict[str, Any]], result: Result) -> None:
    """One ``infer`` of all ``rows``: records/s, and how far it raised this process's peak memory."""
    before = rss_peak_reset()
    began = time.perf_counter()
    frame = pipeline.infer(rows, timeout=max(120.0, len(rows) / 100))
    elapsed = time.perf_counter() - began
    growth = status_kb("VmHWM") * 1024 - before
    failed = int(frame["error"].notna().sum()) if "error" in frame else 0
    if len(frame) != len(rows) or failed:
        raise RuntimeError(f"{len(frame)} results for {len(rows)} rows, {failed} failed")
    result.bulk_records_per_s.append(len(rows) / elapsed)
    result.bulk_rss_growth_mb.append(growth / 2**20)
    print(
        f"  {BULK:13} {len(rows) / elapsed:9,.0f} records/s  peak RSS +{growth / 2**20:,.0f} MB", flush=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50, help="calls per second")
    parser.add_argument("--seconds", type=float, default=20, help="per system and repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--systems",
        default=",".join((*LATENCY_SYSTEMS, BULK)),
        help=f"comma-separated, of {', '.join((*LATENCY_SYSTEMS, BULK))}",
    )
    parser.add_argument(
        "--batch-delay-ms", type=int, default=5, help="JOEY_MAX_BATCH_DELAY_MS of engine and echo"
    )
    parser.add_argument("--bulk-rows", type=int, default=100_000, help="rows of the sdk-bulk call")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - {*LATENCY_SYSTEMS, BULK})
    if unknown:
        parser.error(f"unknown systems {unknown}: choose from {', '.join((*LATENCY_SYSTEMS, BULK))}")
    signal.signal(signal.SIGTERM, interrupt)
    with ExitStack() as stack:
        results = run(args, chosen, stack)
    report(args, chosen, results)


def run(args: argparse.Namespace, chosen: list[str], stack: ExitStack) -> dict[str, Result]:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-bench-")))
    logs = work / "logs"
    logs.mkdir()
    broker = stack.enter_context(EmbeddedBroker(free_port(), work / "tansu.log"))
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "JOEY_KAFKA_BOOTSTRAP": broker.bootstrap,
        "JOEY_DATABASE_URL": stack.enter_context(scratch_database()),
        "JOEY_REDIS_URL": REDIS_URL,
        "JOEY_REDIS_PREFIX": stack.enter_context(scratch_redis_prefix()),
        "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
        "JOEY_ARTIFACT_DIR": str(work / "artifacts"),
        "JOEY_CACHE_DIR": str(work / "cache"),
        "JOEY_PIPELINE_PARTITIONS": str(args.partitions),
        "JOEY_LOGS_PARTITIONS": str(args.partitions),
        "JOEY_MAX_BATCH_DELAY_MS": str(args.batch_delay_ms),
        "JOEY_OIP_GRPC_ADDR": grpc_addr,
        "JOEY_OIP_HTTP_ADDR": http_addr,
        **stack_secrets(),
    }
    settings = CommonSettings(**{k.removeprefix("JOEY_").lower(): v for k, v in env.items()})

    def serve(name: str, argv: list[str]) -> Process:
        process = Process(name, argv, env, logs).start()
        stack.callback(process.stop)
        return process

    def joey(name: str) -> Process:
        return serve(name, [sys.executable, "-m", "joey_cli", "serve", name])

    registry = joey("registry")
    wait_until(lambda: registry.check() or registry_ready(settings.registry_addr), 60, "the registry")
    engine, gateway = joey("engine"), joey("gateway")
    token = admin_token(settings.registry_addr, env["JOEY_ADMIN_PASSWORD"])
    client = Client(settings=settings, workspace=WORKSPACE, token=token)
    stack.callback(client.close)
    model_path = train_and_export(work / "iris.onnx")
    pipeline = client.build_pipeline(PIPELINE).add_model_step(client.upload_model("iris", model_path))
    pipeline.deploy(replicas=1, timeout=120)

    # The floors' topics are made like a pipeline's, so the reply reader is Joey's own.
    hop, echoed = pipeline_topics("bench", "hop"), pipeline_topics("bench", "echo")
    admin = admin_client(settings)
    for name in ("hop", "echo"):
        ensure_topics(admin, pipeline_topic_specs(settings, "bench", name))
    echo = serve(
        "echo",
        [
            sys.executable,
            str(HERE / "echo.py"),
            f"--input-topic={echoed.inputs}",
            f"--output-topic={echoed.outputs}",
            "--group=bench.echo",
            f"--partitions={args.partitions}",
        ],
    )
    wait_until(lambda: echo.check() or b"READY" in echo.log_path.read_bytes(), 60, "the echo's consumer")
    beats = redis.Redis.from_url(REDIS_URL)

    def gateway_up() -> bool:
        gateway.check()
        return bool(heartbeats.live_services(beats, env["JOEY_REDIS_PREFIX"], "gateway"))

    wait_until(gateway_up, 60, "the gateway")

    rows = make_records(1, seed=1)
    x = np.array([r["features"] for r in rows], dtype=np.float32)
    session = ort.SessionOptions()
    session.intra_op_num_threads = 1
    direct = ort.InferenceSession(str(model_path), session)
    grpc_client = grpcclient.InferenceServerClient(grpc_addr)
    http_client = httpclient.InferenceServerClient(http_addr)
    for triton in (grpc_client, http_client):
        triton.register_plugin(Bearer(token))
    value = json.dumps(rows[0]).encode()
    broker_hop = RoundTrip(settings, hop, hop.outputs, value)
    echo_trip = RoundTrip(settings, echoed, echoed.inputs, value)
    wallaroo = WallarooRest(http_addr, token, rows)
    for closing in (broker_hop, echo_trip, wallaroo):
        stack.callback(closing.close)

    def via_sdk() -> list[int]:
        return [int(v) for v in np.ravel(list(pipeline.infer(rows)["out.label"]))]

    def via_grpc() -> list[int]:
        tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return grpc_client.infer(PIPELINE, [tensor]).as_numpy("label").tolist()

    def via_rest() -> list[int]:
        tensor = httpclient.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=False)
        output = httpclient.InferRequestedOutput("label", binary_data=False)
        return http_client.infer(PIPELINE, [tensor], outputs=[output]).as_numpy("label").tolist()

    def via_onnxruntime() -> list[int]:
        return direct.run(["label"], {"features": x})[0].tolist()

    calls: dict[str, Call] = {
        "broker": broker_hop,
        "echo": echo_trip,
        "sdk": via_sdk,
        "oip-rest": via_rest,
        "oip-grpc": via_grpc,
        "wallaroo-rest": wallaroo,
        "direct": via_onnxruntime,
    }
    systems = {name: calls[name] for name in LATENCY_SYSTEMS if name in chosen}
    results = {name: Result() for name in chosen}
    expected = via_onnxruntime()
    for name, call in systems.items():
        try:
            warm_up(name, call, expected)
        except Exception as exc:
            results[name].error = f"{type(exc).__name__}: {exc}"
            print(f"  {name:13} failed in the warm-up: {results[name].error}", flush=True)
    bulk_rows = make_records(args.bulk_rows, seed=2) if BULK in chosen else []
    for rep in range(1, args.repeats + 1):
        for name, call in systems.items():
            result = results[name]
            if result.error is not None:
                continue
            try:
                latencies, rate = paced(call, args.rate, args.seconds)
            except Exception as exc:
                result.error = f"{type(exc).__name__} in repetition {rep}: {exc}"
                print(f"  {name:13} failed: {result.error}", flush=True)
                continue
            result.latencies_ms += latencies
            result.rates.append(rate)
            p50, p99 = np.percentile(latencies, [50, 99])
            result.rep_p50_ms.append(float(p50))
            print(
                f"  rep {rep} {name:13} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  {rate:5.1f} calls/s", flush=True
            )
        if BULK in chosen and results[BULK].error is None:
            try:
                bulk(pipeline, bulk_rows, results[BULK])
            except Exception as exc:
                results[BULK].error = f"{type(exc).__name__} in repetition {rep}: {exc}"
                print(f"  {BULK:13} failed: {results[BULK].error}", flush=True)
        for process in (engine, gateway, echo):
            process.check()
    return results


def report(args: argparse.Namespace, chosen: list[str], results: dict[str, Result]) -> None:
    print(
        f"\none row per call at {args.rate:g} calls/s, {args.seconds:g} s x {args.repeats} per system; "
        f"engine and echo batch delay {args.batch_delay_ms} ms"
    )
    floors = {
        f: np.percentile(results[f].latencies_ms, [50, 99])
        for f in FLOORS
        if f in results and results[f].latencies_ms
    }
    header = f"{'system':14}{'calls':>7}{'calls/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99/p50':>8}"
    header += f"{'rep p50s ms':>20}" + "".join(f"{'p50/' + f:>11}{'p99/' + f:>11}" for f in FLOORS)
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "systems": {}}
    for name in chosen:
        result = results[name]
        summary["systems"][name] = asdict(result) | {"latencies_ms": None}
        if name == BULK:
            if result.bulk_records_per_s:
                rate = float(np.median(result.bulk_records_per_s))
                line = (
                    f"{name:14}{len(result.bulk_records_per_s) * args.bulk_rows:>7,} rows: "
                    f"{rate:,.0f} records/s (median; {min(result.bulk_records_per_s):,.0f}-"
                    f"{max(result.bulk_records_per_s):,.0f}), peak RSS growth "
                    f"{max(result.bulk_rss_growth_mb):,.0f} MB"
                )
                summary["systems"][name] |= {"records_per_s": rate}
                print(line + (f"  then {result.error}" if result.error else ""))
            elif result.error:
                print(f"{name:14} {result.error}")
            continue
        if not result.latencies_ms:
            print(f"{name:14} {result.error or 'no calls'}")
            continue
        p50, p99 = (float(v) for v in np.percentile(result.latencies_ms, [50, 99]))
        spread = f"{min(result.rep_p50_ms):.2f}-{max(result.rep_p50_ms):.2f}"
        line = (
            f"{name:14}{len(result.latencies_ms):>7}{float(np.median(result.rates)):>8.1f}"
            f"{p50:>9.2f}{p99:>9.2f}{p99 / p50:>8.1f}{spread:>20}"
        )
        ratios: dict[str, float] = {}
        for f in FLOORS:
            if f in floors:
                ratios[f"p50/{f}"], ratios[f"p99/{f}"] = p50 / floors[f][0], p99 / floors[f][1]
                line += f"{ratios[f'p50/{f}']:>10.3g}x{ratios[f'p99/{f}']:>10.3g}x"
            else:
                line += f"{'-':>11}{'-':>11}"
        summary["systems"][name] |= {"calls": len(result.latencies_ms), "p50_ms": p50, "p99_ms": p99} | ratios
        print(line + (f"  then {result.error}" if result.error else ""))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
