"""The CLI a user types, against the stack `joey up --detach` started (tests/joey_cli/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import redis

from joey_core import heartbeats
from joey_core.settings import CommonSettings
from tests.conftest import wait_until
from tests.joey_cli.conftest import CliStack, joey
from train_model import make_records


def test_up_upload_deploy_infer_logs(cli_stack: CliStack, iris_model: Path, tmp_path: Path) -> None:
    cli_env = cli_stack.env
    upload = joey(cli_env, "model", "upload", "iris-cli", str(iris_model))
    assert "iris-cli version" in upload.stdout and "input features: float32 [-1, 4]" in upload.stdout
    bad = joey(cli_env, "model", "upload", "iris-cli", __file__, check=False)
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr

    created = joey(cli_env, "pipeline", "create", "cli-pipe", "--model", "iris-cli")
    assert "cli-pipe version" in created.stdout
    deployed = joey(cli_env, "pipeline", "deploy", "cli-pipe", "--replicas", "1")
    assert "Running" in deployed.stdout

    records = tmp_path / "records.json"
    records.write_text(json.dumps(make_records(25)))
    inferred = joey(cli_env, "infer", "cli-pipe", "--file", str(records))
    assert inferred.stderr.splitlines()[-1] == "25 records, 0 failed"
    assert "out.label" in inferred.stdout

    # One failed record of 26 fails the command: a script must not take it for a success.
    records.write_text(json.dumps(make_records(25) + [{"features": "oops"}]))
    partly = joey(cli_env, "infer", "cli-pipe", "--file", str(records), check=False)
    assert partly.returncode == 1, partly.stderr
    assert partly.stderr.splitlines()[-1] == "26 records, 1 failed"
    assert "out.label" in partly.stdout and "oops" in partly.stdout, "the results are shown all the same"
    written = tmp_path / "results.jsonl"
    to_file = joey(cli_env, "infer", "cli-pipe", "--file", str(records), "-o", str(written), check=False)
    assert to_file.returncode == 1 and len(written.read_text().splitlines()) == 26

    # `joey up` started the gateway too, on the addresses it printed: the pipeline answers a plain Open
    # Inference Protocol request with the caller's token.
    infer = urllib.request.Request(
        f"http://{cli_env['JOEY_OIP_HTTP_ADDR']}/v2/models/cli-pipe/infer",
        data=json.dumps(
            {
                "inputs": [
                    {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
                ]
            }
        ).encode(),
        headers={"Authorization": f"Bearer {cli_env['JOEY_TOKEN']}"},
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

    joey(cli_env, "pipeline", "create", "cli-pipe", "--model", "iris-cli", "--check", "sure=out.label > 5")
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
