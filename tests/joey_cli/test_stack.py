"""`joey up` / `joey status` / `joey down` through the real CLI: one stack per user, found from any
directory, a second `up` refused without touching it, a stale state cleared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from joey_cli.stack import pid_alive, registry_ready
from joey_core.oip import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from tests.conftest import wait_until
from tests.joey_cli.conftest import CliStack, error_line, joey


def test_up_prints_the_addresses_of_every_entry_point(cli_stack: CliStack) -> None:
    env = cli_stack.env
    assert cli_stack.first_up is not None
    lines = cli_stack.first_up.stdout.splitlines()
    # The fixture left a state naming a pid that had exited: `up` says so and starts anyway.
    assert any(line.startswith("the stack of pid ") and "exited without stopping" in line for line in lines)
    up = lines.index(next(line for line in lines if line.startswith("Joey is up (pid ")))
    assert lines[up].endswith("`joey down` stops it")
    assert lines[up + 1 :] == [
        f"  registry  {env['JOEY_REGISTRY_ADDR']} (gRPC)",
        f"  gateway   http://{env['JOEY_OIP_HTTP_ADDR']} (REST), {env['JOEY_OIP_GRPC_ADDR']} (gRPC): "
        "the Open Inference Protocol",
        f"  Kafka     {env['JOEY_KAFKA_BOOTSTRAP']} (embedded broker)",
        f"  logs      {cli_stack.state_dir / 'logs'}",
    ]
    # The printed gRPC address is the gateway's.
    with grpc.insecure_channel(env["JOEY_OIP_GRPC_ADDR"]) as channel:
        live = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            grpc_predict_v2_pb2.ServerLiveRequest(), timeout=10
        )
    assert live.live

    status = joey(env, "status", cwd=Path("/"))
    first, *rest = status.stdout.splitlines()
    assert first.startswith(f"Joey is up (pid {cli_stack.state()['pid']}, since ")
    assert rest[:4] == lines[up + 1 :]
    assert rest[4].startswith("  services  registry ") and "gateway" in rest[4]


def test_second_up_is_refused_and_down_stops_the_stack_from_anywhere(
    cli_stack: CliStack, tmp_path: Path
) -> None:
    env = cli_stack.env
    state = cli_stack.state()
    pid = int(state["pid"])  # type: ignore[call-overload]
    services = dict(state["services"])  # type: ignore[call-overload]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (("up",), ("up", "--detach")):
        again = joey(env, *args, check=False, cwd=elsewhere)
        assert again.returncode == 1, again.stdout + again.stderr
        lines = again.stderr.splitlines()
        assert lines[0] == f"Error: Joey is already running (pid {pid}); `joey down` stops it"
        assert lines[1] == f"  registry  {env['JOEY_REGISTRY_ADDR']} (gRPC)"
        assert f"http://{env['JOEY_OIP_HTTP_ADDR']} (REST)" in lines[2]
        assert "stopping" not in again.stdout, "the running stack is left alone"
    assert cli_stack.state()["pid"] == pid, "its state is untouched"
    assert registry_ready(env["JOEY_REGISTRY_ADDR"])

    # A state directory of its own is another stack: none runs there.
    other = joey(env | {"JOEY_STATE_DIR": str(tmp_path / "other")}, "status", check=False)
    assert error_line(other) == (
        f"Error: Joey is not running (no stack in {tmp_path / 'other'}): start it with `joey up`"
    )

    down = joey(env, "down", cwd=elsewhere)
    assert down.stdout.splitlines() == [f"Joey stopped (pid {pid})"]
    assert not pid_alive(pid) and not any(pid_alive(p) for p in services.values())
    assert not (cli_stack.state_dir / "stack.json").exists()
    assert not registry_ready(env["JOEY_REGISTRY_ADDR"])
    assert joey(env, "down", cwd=Path("/")).stdout.splitlines() == ["Joey was not running"]
    status = joey(env, "status", check=False)
    assert status.returncode == 1
    assert error_line(status) == (
        f"Error: Joey is not running (no stack in {cli_stack.state_dir}): start it with `joey up`"
    )
    # Every command that needs the stack says where it looked and what to do.
    needing = (("model", "list"), ("pipeline", "list"), ("workspace", "list"), ("workspace", "create", "w"))
    for args in needing:
        result = joey(env, *args, check=False)
        assert error_line(result) == (
            f"Error: cannot reach the registry at {env['JOEY_REGISTRY_ADDR']}: is Joey running? Start it "
            "with `joey up`, or point --registry / JOEY_REGISTRY_ADDR at a running registry"
        ), args


def test_a_killed_supervisor_leaves_a_stale_stack_that_down_clears(cli_stack: CliStack) -> None:
    env = cli_stack.env
    state = cli_stack.state()
    pid = int(state["pid"])  # type: ignore[call-overload]
    left = {name: int(p) for name, p in state["services"].items()}  # type: ignore[attr-defined]
    left["broker"] = int(state["broker"])  # type: ignore[call-overload]
    # kill -9: no stop in order; the services and the broker, in sessions of their own, run on.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 10, "the supervisor gone")
    assert all(pid_alive(p) for p in left.values())

    status = joey(env, "status", check=False)
    assert error_line(status) == (
        f"Error: Joey is not running (no stack in {cli_stack.state_dir}; pid {pid} exited without stopping "
        "it, `joey down` stops what it left): start it with `joey up`"
    )
    down = joey(env, "down", cwd=Path("/"))
    first, last = down.stdout.splitlines()
    assert first.startswith(f"the stack of pid {pid} exited without stopping: stopping what it left, ")
    for name, p in left.items():
        assert f"{name} (pid {p})" in first
    assert last == "Joey was not running"
    assert not any(pid_alive(p) for p in left.values())
    assert not (cli_stack.state_dir / "stack.json").exists()


def test_a_stale_state_never_stops_a_process_that_merely_reuses_a_pid(tmp_path: Path) -> None:
    # Pids are reused: a live process named in a stale state is stopped only if it is still the one started.
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "-m", "joey_logger"])
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        services = {"logger": leftover.pid, "engine": stranger.pid}
        (state_dir / "stack.json").write_text(json.dumps({"pid": gone.pid, "services": services}))
        down = joey(os.environ | {"JOEY_STATE_DIR": str(state_dir)}, "down")
        assert down.stdout.splitlines() == [
            f"the stack of pid {gone.pid} exited without stopping: stopping what it left, "
            f"logger (pid {leftover.pid})",
            "Joey was not running",
        ]
        assert leftover.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None, "not the engine it was: left alone"
        assert not (state_dir / "stack.json").exists()
    finally:
        for process in (leftover, stranger):
            process.kill()
            process.wait()


def test_a_state_file_that_is_not_json_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{half a stat")
    status = joey(os.environ | {"JOEY_STATE_DIR": str(tmp_path)}, "status", check=False)
    assert status.returncode == 1
    state_file = tmp_path / "stack.json"
    assert status.stderr.splitlines()[0] == f"ignoring {state_file}: not the JSON `joey up` writes"
    assert error_line(status) == (
        f"Error: Joey is not running (no stack in {tmp_path}): start it with `joey up`"
    )
