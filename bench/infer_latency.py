"""Latency of the synchronous inference endpoint against a direct onnxruntime call, in one run.

One request (a batch of ``--rows`` iris rows) at a time, at a steady ``--rate`` per second, for
``--seconds`` per system and repetition; the systems take turns, repetition by repetition:

* grpc: tritonclient.grpc -> `joey serve gateway` -> Kafka -> `joey serve engine` -> Kafka -> gateway
* rest: the same through tritonclient.http (JSON tensors, HTTP/1.1 keep-alive)
* direct: onnxruntime.InferenceSession.run on the same model, in this process (1 intra-op thread,
  as the engine's replicas use)

Latency is the client's wall time per call. A call that takes longer than the interval delays the
next one, so the rate is a ceiling, not a guarantee (the table reports what was achieved).

    python bench/gateway_latency.py --rate 50 --seconds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from joey.client import Client
from joey_cli.broker import EmbeddedBroker
from joey_core import heartbeats
from joey_core.settings import CommonSettings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_throughput import (  # noqa: E402
    REDIS_URL,
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

from train_model import make_records, train_and_export  # noqa: E402

PIPELINE = "bench-gateway"
WARMUP_CALLS = 50

Call = Callable[[], np.ndarray]


class Bearer(grpcclient.InferenceServerClientPlugin):
    """Presents the bench's token to the gateway on every tritonclient call."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def __call__(self, request: object) -> None:
        request.headers["authorization"] = self._header  # type: ignore[attr-defined]


def paced(call: Call, rate: float, seconds: float) -> tuple[list[float], float]:
    """Latencies (ms) of calls made every 1/rate s for ``seconds``, and the achieved rate."""
    interval = 1.0 / rate
    latencies = []
    start = next_at = time.perf_counter()
    while next_at - start < seconds:
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        began = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - began) * 1000)
        next_at = max(next_at + interval, time.perf_counter())
    return latencies, len(latencies) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20, help="per system and repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1, help="rows (records) per request")
    parser.add_argument("--batch-delay-ms", type=int, default=5, help="JOEY_MAX_BATCH_DELAY_MS of the engine")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    with ExitStack() as stack:
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

        def serve(name: str) -> Process:
            process = Process(name, [sys.executable, "-m", "joey_cli", "serve", name], env, logs).start()
            stack.callback(process.stop)
            return process

        registry = serve("registry")
        wait_until(lambda: registry.check() or registry_ready(settings.registry_addr), 60, "the registry")
        engine, gateway = serve("engine"), serve("gateway")
        token = admin_token(settings.registry_addr, env["JOEY_ADMIN_PASSWORD"])
        client = Client(settings=settings, token=token)
        stack.callback(client.close)
        model_path = train_and_export(work / "iris.onnx")
        pipeline = client.build_pipeline(PIPELINE).add_model_step(client.upload_model("iris", model_path))
        pipeline.deploy(replicas=1, timeout=120)
        beats = redis.Redis.from_url(REDIS_URL)

        def gateway_up() -> bool:
            gateway.check()
            return bool(heartbeats.live_services(beats, env["JOEY_REDIS_PREFIX"], "gateway"))

        wait_until(gateway_up, 60, "the gateway")

        x = np.array([r["features"] for r in make_records(args.rows, seed=1)], dtype=np.float32)
        session = ort.SessionOptions()
        session.intra_op_num_threads = 1
        direct = ort.InferenceSession(str(model_path), session)
        grpc_client = grpcclient.InferenceServerClient(grpc_addr)
        http_client = httpclient.InferenceServerClient(http_addr)
        for triton in (grpc_client, http_client):
            triton.register_plugin(Bearer(token))

        def via_grpc() -> np.ndarray:
            tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return grpc_client.infer(PIPELINE, [tensor]).as_numpy("label")

        def via_rest() -> np.ndarray:
            tensor = httpclient.InferInput("features", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=False)
            output = httpclient.InferRequestedOutput("label", binary_data=False)
            return http_client.infer(PIPELINE, [tensor], outputs=[output]).as_numpy("label")

        def via_onnxruntime() -> np.ndarray:
            return direct.run(["label"], {"features": x})[0]

        systems = {"grpc": via_grpc, "rest": via_rest, "direct": via_onnxruntime}
        expected = via_onnxruntime().tolist()
        for name, call in systems.items():
            for _ in range(WARMUP_CALLS):
                if call().tolist() != expected:
                    raise RuntimeError(f"{name} disagrees with onnxruntime on the labels")
        results: dict[str, list[float]] = {name: [] for name in systems}
        rates: dict[str, list[float]] = {name: [] for name in systems}
        for rep in range(1, args.repeats + 1):
            for name, call in systems.items():
                latencies, rate = paced(call, args.rate, args.seconds)
                results[name] += latencies
                rates[name].append(rate)
                p50, p99 = np.percentile(latencies, [50, 99])
                print(
                    f"  rep {rep} {name:7} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  {rate:5.1f} req/s",
                    flush=True,
                )
            engine.check()

        print(
            f"\n{args.rows} row(s) per request at {args.rate:g} requests/s, "
            f"{args.seconds:g} s x {args.repeats} per system; engine batch delay {args.batch_delay_ms} ms"
        )
        direct_p50, direct_p99 = np.percentile(results["direct"], [50, 99])
        header = f"{'system':8}{'calls':>8}{'req/s':>8}{'p50 ms':>10}{'p99 ms':>10}"
        header += f"{'p50 / direct':>14}{'p99 / direct':>14}"
        print(header)
        print("-" * len(header))
        for name, latencies in results.items():
            p50, p99 = np.percentile(latencies, [50, 99])
            rate = float(np.median(rates[name]))
            print(
                f"{name:8}{len(latencies):>8}{rate:>8.1f}{p50:>10.2f}{p99:>10.2f}"
                f"{p50 / direct_p50:>14.0f}{p99 / direct_p99:>14.0f}"
            )


if __name__ == "__main__":
    main()
