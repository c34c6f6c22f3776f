"""Time from ``pipeline.deploy()`` to ready, for an ONNX pipeline and a python-step pipeline.

Starts its own stack (embedded broker, `joey serve registry`, `joey serve engine`), uploads the iris
model and the example python step, then deploys and undeploys each pipeline ``--repeats`` times with
``--replicas`` replicas, timing ``deploy()`` (which waits until every replica is ready) on the SDK's
clock. Each run uses a fresh pipeline name, so topics and consumer groups are new, as for a user's
first deploy. The progress lines the SDK reports (``on_status``) are printed with their time when
``--verbose``.

    python bench/deploy_time.py --repeats 5 --replicas 2

``--checkout DIR`` runs the services from another source tree (e.g. ``git archive main | tar -x -C DIR``)
instead of this one, to compare two versions on the same machine; the SDK doing the timing is this one.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa

from joey.client import Client, DeploymentStatus
from joey_cli.broker import EmbeddedBroker
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

from train_model import train_and_export  # noqa: E402

PREP = HERE.parent / "examples" / "steps" / "iris_preprocess.py"
FIELDS = ("sepal_length_mm", "sepal_width_mm", "petal_length_mm", "petal_width_mm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--verbose", action="store_true", help="print each run's progress lines")
    parser.add_argument("--keep-logs", type=Path, help="copy the service logs here")
    parser.add_argument("--checkout", type=Path, help="run the services from this source tree")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="joey-bench-")))
        logs = work / "logs"
        logs.mkdir()
        if args.keep_logs:
            stack.callback(shutil.copytree, logs, args.keep_logs, dirs_exist_ok=True)
        broker = stack.enter_context(EmbeddedBroker(free_port(), work / "tansu.log"))
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
            **stack_secrets(),
        }
        if args.checkout:
            # Ahead of the editable install's finder, which Python consults after PYTHONPATH.
            roots = [args.checkout / "src", *sorted((args.checkout / "services").glob("*"))]
            env["PYTHONPATH"] = ":".join(str(root.resolve()) for root in roots)
        settings = CommonSettings(**{k.removeprefix("JOEY_").lower(): v for k, v in env.items()})

        def serve(name: str) -> Process:
            process = Process(name, [sys.executable, "-m", "joey_cli", "serve", name], env, logs).start()
            stack.callback(process.stop)
            return process

        registry = serve("registry")
        wait_until(lambda: registry.check() or registry_ready(settings.registry_addr), 60, "the registry")
        serve("engine")
        client = Client(
            settings=settings, token=admin_token(settings.registry_addr, env["JOEY_ADMIN_PASSWORD"])
        )
        stack.callback(client.close)
        iris = client.upload_model("iris", train_and_export(work / "iris.onnx"))
        prep = client.upload_model(
            "iris-prep",
            PREP,
            framework="python",
            input_schema=pa.schema([(name, pa.float64()) for name in FIELDS]),
            output_schema=pa.schema([("features", pa.list_(pa.float32(), 4))]),
        )
        kinds = {"onnx": [iris], "python step": [prep, iris]}
        # The first deploy also waits for the engine to start and read joey.deployments: not counted.
        warmup = client.build_pipeline("bench-warmup").add_model_step(iris)
        warmup.deploy(replicas=1, timeout=120)
        warmup.undeploy()

        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        for rep in range(args.repeats):
            for kind, models in kinds.items():
                pipeline = client.build_pipeline(f"bench-{kind.split()[0]}-{rep}")
                for model in models:
                    pipeline.add_model_step(model)
                pipeline.create()
                start = time.perf_counter()

                def show(status: DeploymentStatus, start: float = start) -> None:
                    if args.verbose:
                        print(f"    {time.perf_counter() - start:6.2f} s  {status.message}", flush=True)

                pipeline.deploy(replicas=args.replicas, timeout=120, on_status=show)
                elapsed = time.perf_counter() - start
                seconds[kind].append(elapsed)
                print(f"  {kind:12} run {rep + 1}: ready in {elapsed:.2f} s", flush=True)
                pipeline.undeploy()
                wait_until(lambda p=pipeline: not p.status().replicas, 120, "the replicas to stop")

        print(f"\n{args.replicas} replicas, {args.partitions} partitions; median of {args.repeats} runs")
        print(f"{'pipeline':14}{'median s':>10}{'min s':>8}{'max s':>8}")
        for kind, values in seconds.items():
            print(f"{kind:14}{statistics.median(values):>10.2f}{min(values):>8.2f}{max(values):>8.2f}")


if __name__ == "__main__":
    main()
