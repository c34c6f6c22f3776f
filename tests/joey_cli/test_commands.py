"""The CLI a user types, against a stack started by `joey up --detach` (embedded broker included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from joey_core import heartbeats
from joey_core.settings import CommonSettings
from tests.conftest import free_port, wait_until
from train_model import make_records


def joey(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "joey_cli", *args], env=env, capture_output=True, text=True, timeout=180
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"joey {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture()
def cli_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A second, separate stack: its own embedded broker, registry port and state dir; same database."""
    return (
        os.environ
        | env
        | {
            "JOEY_EMBEDDED_BROKER": "true",
            "JOEY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_STATE_DIR": str(tmp_path / "state"),
            "JOEY_REDIS_PREFIX": env["JOEY_REDIS_PREFIX"] + "cli",
            "JOEY_OIP_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_OIP_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        }
    )


def test_up_upload_deploy_infer_logs_down(cli_env: dict[str, str], iris_model: Path, tmp_path: Path) -> None:
    up = joey(cli_env, "up", "--detach")
    try:
        assert "Joey is up" in up.stdout
        assert "already running" in joey(cli_env, "up", "--detach", check=False).stderr

        upload = joey(cli_env, "model", "upload", "iris-cli", str(iris_model))
        assert "iris-cli version" in upload.stdout and "input features: float32 [-1, 4]" in upload.stdout
        bad = joey(cli_env, "model", "upload", "iris-cli", __file__, check=False)
        assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr

        created = joey(cli_env, "pipeline", "create", "cli-pipe", "--model", "iris-cli")
        assert "cli-pipe version" in created.stdout
        deployed = joey(cli_env, "pipeline", "deploy", "cli-pipe", "--replicas", "1")
        assert "Running" in deployed.stdout

        records = tmp_path / "records.json"
        records.write_text(json.dumps(make_records(25) + [{"features": "oops"}]))
        inferred = joey(cli_env, "infer", "cli-pipe", "--file", str(records))
        assert "26 records, 1 failed" in inferred.stderr
        assert "out.label" in inferred.stdout

        # `joey up` started the gateway too: the pipeline answers a plain Open Inference Protocol request.
        infer = urllib.request.Request(
            f"http://{cli_env['JOEY_OIP_HTTP_ADDR']}/v2/models/cli-pipe/infer",
            data=json.dumps(
                {
                    "inputs": [
                        {
                            "name": "features",
                            "shape": [1, 4],
                            "datatype": "FP32",
                            "data": [5.1, 3.5, 1.4, 0.2],
                        }
                    ]
                }
            ).encode(),
            method="POST",
        )
        with urllib.request.urlopen(infer, timeout=60) as response:
            outputs = {o["name"]: o for o in json.loads(response.read())["outputs"]}
        assert outputs["label"]["shape"] == [1] and outputs["probabilities"]["shape"] == [1, 3]

        wait_until(
            lambda: "oops" in joey(cli_env, "logs", "cli-pipe", "--failed").stdout,
            30,
            "the failure in the log",
        )

        joey(
            cli_env, "pipeline", "create", "cli-pipe", "--model", "iris-cli", "--check", "sure=out.label > 5"
        )
        rolled = joey(
            cli_env,
            "pipeline",
            "deploy",
            "cli-pipe",
            "--autoscale",
            "1-2",
            "--cpus",
            "500m",
            "--memory",
            "1Gi",
        )
        assert "Running (version 2, 1 replicas, autoscaling 1-2 on queue age > 1 s)" in rolled.stdout
        back = joey(cli_env, "pipeline", "rollback", "cli-pipe")
        assert "Running (version 1, 1 replicas, autoscaling 1-2" in back.stdout, back.stdout
        bad_scale = joey(cli_env, "pipeline", "deploy", "cli-pipe", "--autoscale", "2", check=False)
        assert bad_scale.returncode != 0 and "expected MIN-MAX" in bad_scale.stderr

        assert "undeployed" in joey(cli_env, "pipeline", "undeploy", "cli-pipe").stdout
    finally:
        down = joey(cli_env, "down", check=False)
    assert down.stdout.strip() == "stopped"
    assert not (Path(cli_env["JOEY_STATE_DIR"]) / "stack.json").exists()
    assert joey(cli_env, "down").stdout.strip() == "Joey was not running"


def test_serve_becomes_the_service_process(env: dict[str, str], settings: CommonSettings) -> None:
    # `joey serve` execs `python -m joey_<name>`: the same pid, so a supervisor's signals reach the
    # service, which then stops cleanly; and the service runs without the SDK the command loaded.
    # (`settings` creates the platform topics the logger reads.)
    instance = f"serve-test-{os.getpid()}"
    client = redis.Redis.from_url(env["JOEY_REDIS_URL"])

    def ready() -> bool:
        return instance in heartbeats.live_services(client, env["JOEY_REDIS_PREFIX"], "logger")

    process = subprocess.Popen(
        [sys.executable, "-m", "joey_cli", "serve", "logger"],
        env=os.environ | env | {"JOEY_INSTANCE_ID": instance, "JOEY_LOGGER_GROUP": f"joey.logger.{instance}"},
    )
    try:
        wait_until(ready, 60, "logger ready")
        command = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert command[1:4] == [b"-P", b"-m", b"joey_logger"], command
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not ready(), "a clean stop retires the heartbeat"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
