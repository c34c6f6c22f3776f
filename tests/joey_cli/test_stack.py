"""`joey up` / `joey status` / `joey down` through the real CLI: one stack per user, found from any
directory, a second `up` refused without touching it, a stale state cleared."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from joey_cli.services import DATABASE_SERVICES, SERVICES
from joey_cli.stack import (
    StackDir,
    StackSettings,
    claim,
    pid_alive,
    process_start,
    registry_ready,
    service_env,
    settings_env,
)
from tests.conftest import free_port, wait_until
from tests.joey_cli.conftest import CliStack, error_line, joey


def test_up_prints_the_addresses_of_every_entry_point(cli_stack: CliStack) -> None:
    env = cli_stack.env
    assert cli_stack.first_up is not None
    lines = cli_stack.first_up.stdout.splitlines()
    # The fixture left a state naming a pid that had exited: `up` says so and starts anyway.
    assert any(
        line.startswith("the stack of pid ") and "had exited without stopping" in line for line in lines
    )
    up = lines.index(next(line for line in lines if line.startswith("Joey is up (pid ")))
    assert lines[up].endswith("`joey down` stops it")
    assert lines[up + 1 :] == [
        f"  registry  {env['JOEY_REGISTRY_ADDR']} (gRPC)",
        f"  gateway   http://{env['JOEY_OIP_HTTP_ADDR']} (REST), {env['JOEY_OIP_GRPC_ADDR']} (gRPC): "
        "the Open Inference Protocol",
        f"  Kafka     {env['JOEY_KAFKA_BOOTSTRAP']} (embedded broker)",
        f"  logs      {cli_stack.state_dir / 'logs'}",
        f"  login     admin (token in {env['JOEY_CREDENTIALS']})",
    ]
    # The printed gRPC address is the gateway's. A standard OIP client asks: Joey's own OIP stubs
    # register the same proto names as tritonclient's, and the gateway tests load those.
    assert grpcclient.InferenceServerClient(env["JOEY_OIP_GRPC_ADDR"]).is_server_live()

    status = joey(env, "status", cwd=Path("/"))
    first, *rest = status.stdout.splitlines()
    assert first.startswith(f"Joey is up (pid {cli_stack.state()['pid']}, since ")
    assert rest[:5] == lines[up + 1 :]
    assert rest[5].startswith("  services  registry ") and "gateway" in rest[5]


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
    (line,) = down.stdout.splitlines()
    assert line.startswith(
        f"Joey was not running; the stack of pid {pid} had exited without stopping: stopped what it left, "
    )
    for name, p in left.items():
        assert f"{name} (pid {p})" in line
    assert not any(pid_alive(p) for p in left.values())
    assert not (cli_stack.state_dir / "stack.json").exists()


def _stale_state(state_dir: Path, **state: object) -> None:
    """What a supervisor killed without stopping leaves: a state naming a pid that has exited."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    state_dir.mkdir(exist_ok=True)
    (state_dir / "stack.json").write_text(json.dumps({"pid": gone.pid, **state}))


def _idle(*args: str, **popen: object) -> subprocess.Popen[str]:
    """A process that waits for a signal, in a session of its own as the stack's processes are."""
    return subprocess.Popen([*args], start_new_session=True, text=True, **popen)  # type: ignore[call-overload]


def test_a_stale_state_never_stops_a_process_that_merely_reuses_a_pid(tmp_path: Path) -> None:
    # Pids are reused: a live process named in a stale state is stopped only if it is still the one
    # started, by pid and start time, and ours.
    earlier = subprocess.Popen(["sleep", "600"])
    earlier_start = process_start(earlier.pid)
    earlier.kill()
    earlier.wait()
    leftover = _idle("sleep", "600")
    stranger = _idle("sleep", "600")  # reuses a pid: its start time is not the one recorded
    while process_start(stranger.pid) == earlier_start:
        # Start times count clock ticks (10 ms): one started in the same tick is not a stranger yet.
        stranger.kill()
        stranger.wait()
        stranger = _idle("sleep", "600")
    # Another user's process (pid 1 when not root): never ours to stop, whatever the state says.
    others = _idle("sleep", "600", user=65534) if os.getuid() == 0 else None
    other_pid = others.pid if others else 1
    other_start = Path(f"/proc/{other_pid}/stat").read_text().rpartition(")")[2].split()[19]
    try:
        services = {"logger": leftover.pid, "engine": stranger.pid, "assayer": other_pid}
        started = {"logger": process_start(leftover.pid), "engine": earlier_start, "assayer": other_start}
        _stale_state(tmp_path, services=services, started=started)
        down = joey(os.environ | {"JOEY_STATE_DIR": str(tmp_path)}, "down")
        (line,) = down.stdout.splitlines()
        assert line.startswith("Joey was not running; the stack of pid "), line
        assert line.endswith(
            f"had exited without stopping: stopped what it left, logger (pid {leftover.pid})"
        )
        assert "Traceback" not in down.stderr
        assert leftover.wait(10) == -signal.SIGTERM
        assert stranger.poll() is None, "not the engine it was: left alone"
        assert others is None or others.poll() is None, "another user's: left alone"
        assert not (tmp_path / "stack.json").exists()
    finally:
        for process in (leftover, stranger, others):
            if process:
                process.kill()
                process.wait()


STOP_LOGGER = """
import signal, sys
def stopped(*_):
    with open(sys.argv[1], "a") as log:
        log.write(sys.argv[2] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
print("ready", flush=True)
signal.pause()
"""


def test_a_stale_stack_is_stopped_services_newest_first_then_the_broker(tmp_path: Path) -> None:
    stops = tmp_path / "stops.log"
    names = ["registry", "engine", "logger", "assayer", "gateway", "broker"]
    left = {
        name: _idle(sys.executable, "-c", STOP_LOGGER, str(stops), name, stdout=subprocess.PIPE)
        for name in names
    }
    try:
        for process in left.values():
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        pids = {name: process.pid for name, process in left.items()}
        services = {name: pid for name, pid in pids.items() if name != "broker"}
        started = {name: process_start(pid) for name, pid in pids.items()}
        _stale_state(tmp_path / "state", services=services, broker=pids["broker"], started=started)
        down = joey(os.environ | {"JOEY_STATE_DIR": str(tmp_path / "state")}, "down")
        order = ["gateway", "assayer", "logger", "engine", "registry", "broker"]
        assert stops.read_text().splitlines() == order, "each stopped in turn, the broker last"
        assert down.stdout.splitlines()[0].endswith(
            "stopped what it left, " + ", ".join(f"{name} (pid {pids[name]})" for name in order)
        )
    finally:
        for process in left.values():
            process.kill()
            process.wait()


def test_down_stops_only_the_process_holding_the_lock_never_a_pid_from_another_state(tmp_path: Path) -> None:
    # The holder may be a `joey up` clearing the stale state below, or one that has not written its own yet.
    bystander = _idle("sleep", "600")
    env = os.environ | {"JOEY_STATE_DIR": str(tmp_path)}
    (tmp_path / "stack.json").write_text(json.dumps({"pid": bystander.pid, "status": "ready"}))
    lock = tmp_path / "stack.lock"
    # A holder that has not named itself: nobody to stop.
    unnamed = subprocess.Popen(
        ["flock", "--no-fork", str(lock), "-c", "echo held; exec sleep 600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    holder = None
    try:
        assert unnamed.stdout is not None and unnamed.stdout.readline() == "held\n"
        down = joey(env, "down", check=False)
        assert error_line(down) == (
            f"Error: a process holds {lock} without naming itself: is it a `joey up`? Try again, or see "
            "`joey status`"
        )
        assert bystander.poll() is None
        unnamed.kill()
        unnamed.wait()
        wait_until(lambda: joey(env, "status", check=False).returncode == 1, 30, "the lock released")

        # A holder that named itself, as `joey up` does the moment it takes the lock: it is the one stopped.
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        status = joey(env, "status")
        assert status.stdout.splitlines()[0] == f"Joey is starting (pid {holder.pid}); `joey down` stops it"
        down = joey(env, "down")
        assert down.stdout.splitlines() == [f"Joey stopped (pid {holder.pid})"]
        assert holder.wait(10) == -signal.SIGTERM
        assert bystander.poll() is None, "named only in a state that is not the holder's: left alone"
    finally:
        for process in (bystander, unnamed, holder):
            if process and process.poll() is None:
                process.kill()
                process.wait()


HOLDER = """
import signal, sys
from pathlib import Path
from joey_cli.stack import StackDir
lock = StackDir(Path(sys.argv[1])).lock("up")
print("held" if lock else "refused", flush=True)
signal.pause()
"""

PROBES = """
import sys
from pathlib import Path
from joey_cli.stack import StackDir
files = StackDir(Path(sys.argv[1]))
files.held()
print("probing", flush=True)
while True:
    files.held()
"""


def test_a_status_probe_never_makes_a_claim_fail(tmp_path: Path) -> None:
    # `joey status` (and `down`, and a refused `up`) probe the lock while a `joey up` may be claiming it.
    (tmp_path / "stack.lock").touch()
    probes = subprocess.Popen(
        [sys.executable, "-c", PROBES, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert probes.stdout is not None and probes.stdout.readline() == "probing\n"
        files = StackDir(tmp_path)
        for _ in range(2000):  # a probe met about once in 200 claims before claims asked again
            claim(files, say=print).release()
    finally:
        probes.kill()
        probes.wait()


def test_pid_alive_leaves_the_callers_children_to_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    wait_until(lambda: not pid_alive(child.pid), 30, "the child exited")
    assert child.wait() == 3, "not reaped by pid_alive: its exit code is the caller's to read"


def test_an_empty_state_dir_is_unset(tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = os.environ | {"JOEY_STATE_DIR": "", "XDG_STATE_HOME": str(tmp_path / "xdg")}
    status = joey(env, "status", check=False, cwd=elsewhere)
    assert error_line(status) == (
        f"Error: Joey is not running (no stack in {tmp_path / 'xdg' / 'joey'}): start it with `joey up`"
    )


def test_a_state_file_that_is_not_json_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{half a stat")
    status = joey(os.environ | {"JOEY_STATE_DIR": str(tmp_path)}, "status", check=False)
    assert status.returncode == 1
    state_file = tmp_path / "stack.json"
    assert status.stderr.splitlines()[0] == f"Warning: ignoring {state_file}: not the JSON `joey up` writes"
    assert error_line(status) == (
        f"Error: Joey is not running (no stack in {tmp_path}): start it with `joey up`"
    )


def test_two_concurrent_detached_ups_start_one_stack(cli_stack_once: CliStack) -> None:
    # Stopped first whether it runs or not: the stack is not started only to be stopped.
    cli_stack = cli_stack_once
    env = cli_stack.env
    joey(env, "down")
    ups = [
        subprocess.Popen(
            [sys.executable, "-m", "joey_cli", "up", "--detach"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(up.wait(180), *up.communicate()) for up in ups]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (won,) = (out for code, out, _ in results if code == 0)
    (lost,) = (err for code, _, err in results if code == 1)
    pid = cli_stack.state()["pid"]
    assert f"Joey is up (pid {pid}); `joey down` stops it" in won.splitlines()
    assert lost.splitlines()[0].startswith("Error: Joey is already running (pid "), lost
    assert registry_ready(env["JOEY_REGISTRY_ADDR"])


def _own_stack_env(env: dict[str, str], state_dir: Path) -> dict[str, str]:
    """The session's database and Redis, with ports and a state directory of its own."""
    return (
        os.environ
        | env
        | {
            "JOEY_STATE_DIR": str(state_dir),
            "JOEY_EMBEDDED_BROKER": "true",
            "JOEY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "JOEY_REGISTRY_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_OIP_GRPC_ADDR": f"127.0.0.1:{free_port()}",
            "JOEY_OIP_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        }
    )


def test_a_missing_redis_or_postgres_is_one_error_line_without_the_password(
    env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    redis_url = f"redis://:s3cret@127.0.0.1:{port}/0"
    database_url = f"postgresql://postgres:s3cret@127.0.0.1:{port}/joey"
    expected = {
        redis_url: f"Error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (",
        database_url: f"Error: cannot reach Postgres at postgresql://postgres:***@127.0.0.1:{port}/joey (",
    }
    what_to_do = {
        redis_url: "): start it, or set JOEY_REDIS_URL",
        database_url: "): start it, or set JOEY_DATABASE_URL",
    }
    own = _own_stack_env(env, tmp_path / "state")
    for variable, url in (("JOEY_REDIS_URL", redis_url), ("JOEY_DATABASE_URL", database_url)):
        for detach in ((), ("--detach",)):
            up = joey(own | {variable: url}, "up", *detach, check=False)
            assert up.returncode == 1, up.stdout + up.stderr
            first = up.stderr.splitlines()[0]
            assert first.startswith(expected[url]) and first.endswith(what_to_do[url]), first
            assert "Traceback" not in up.stderr and "s3cret" not in up.stdout + up.stderr
            assert "stopping Joey" not in up.stdout, "nothing was started"
            if detach:
                # The supervisor's own error, then where its whole output is.
                assert (
                    up.stderr.splitlines()[-1]
                    == f"(the whole output of `joey up`: {tmp_path / 'state' / 'up.log'})"
                )
            status = joey(own, "status", check=False)
            assert status.returncode == 1 and "not running" in status.stderr


def test_registry_option_is_where_up_starts_the_registry_and_refused_by_down_and_status(
    env: dict[str, str], tmp_path: Path
) -> None:
    own = _own_stack_env(env, tmp_path / "state")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        up = joey(own, "--registry", addr, "up", check=False)
    assert error_line(up).startswith(f"Error: registry {addr} already in use by another process"), up.stderr
    for command in ("down", "status"):
        result = joey(own, "--registry", addr, command, check=False)
        assert error_line(result) == (
            f"Error: --registry does not apply to `joey {command}`: it finds the stack through "
            "JOEY_STATE_DIR; leave --registry out"
        )


def test_ctrl_c_while_a_detached_stack_starts_stops_it(env: dict[str, str], tmp_path: Path) -> None:
    own = _own_stack_env(env, tmp_path / "state")
    up = subprocess.Popen(
        [sys.executable, "-m", "joey_cli", "up", "--detach"],
        env=own,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state_file = tmp_path / "state" / "stack.json"
    try:
        starting = wait_until(
            lambda: state_file.exists() and json.loads(state_file.read_text()), 60, "a state"
        )
        supervisor = starting["pid"]  # type: ignore[index]
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=180)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [
        "Error: interrupted: the stack that was starting was stopped"
    ], err
    assert not pid_alive(supervisor)
    status = joey(own, "status", check=False)
    assert error_line(status).startswith("Error: Joey is not running (no stack in ")


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().partition("=")[::2] for pair in pairs if pair)


def test_only_the_services_that_use_the_database_are_given_its_url(cli_stack: CliStack) -> None:
    cli_stack.ensure_up()
    services = cli_stack.state()["services"]
    assert isinstance(services, dict) and set(services) == set(SERVICES)
    for name, pid in services.items():
        environ = _environ(pid)
        assert ("JOEY_DATABASE_URL" in environ) == (name in DATABASE_SERVICES), name
        # Given as they were: secrets spelled out for the service, not as a masked repr.
        assert environ["JOEY_REDIS_URL"] == cli_stack.env["JOEY_REDIS_URL"]
    assert _environ(services["registry"])["JOEY_DATABASE_URL"] == cli_stack.env["JOEY_DATABASE_URL"]


def test_the_services_given_the_database_are_those_whose_settings_have_it() -> None:
    from joey_assayer.settings import AssayerSettings
    from joey_connector_bridge.settings import BridgeSettings
    from joey_engine.settings import EngineSettings
    from joey_gateway.settings import GatewaySettings
    from joey_logger.settings import LoggerSettings
    from joey_orchestrator.settings import OrchestratorSettings
    from joey_registry.settings import RegistrySettings

    classes = {
        "registry": RegistrySettings,
        "engine": EngineSettings,
        "logger": LoggerSettings,
        "assayer": AssayerSettings,
        "gateway": GatewaySettings,
        "connector-bridge": BridgeSettings,
        "orchestrator": OrchestratorSettings,
    }
    assert set(classes) == set(SERVICES)
    assert {name for name, cls in classes.items() if "database_url" in cls.model_fields} == DATABASE_SERVICES


def test_the_environment_of_a_service_spells_out_secrets_and_json(tmp_path: Path) -> None:
    settings = StackSettings(
        state_dir=tmp_path,
        database_url="postgresql://u:pw@h/db",
        kafka_config={"client.dns.lookup": "use_all_dns_ips", "socket.keepalive.enable": True},
    )
    env = settings_env(settings)
    assert env["JOEY_DATABASE_URL"] == "postgresql://u:pw@h/db"
    assert json.loads(env["JOEY_KAFKA_CONFIG"]) == {
        "client.dns.lookup": "use_all_dns_ips",
        "socket.keepalive.enable": True,
    }
    assert "JOEY_TLS_CA" not in env  # unset stays unset, not "None"
    assert "JOEY_DATABASE_URL" not in service_env(env, "engine")
    assert service_env(env, "logger")["JOEY_DATABASE_URL"] == "postgresql://u:pw@h/db"


def test_services_inherit_no_credentials_from_the_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token or password exported in the shell that runs `joey up` reaches no service by inheritance."""
    names = ("JOEY_TOKEN", "JOEY_CREDENTIALS", "JOEY_ADMIN_PASSWORD", "JOEY_SERVICE_TOKEN", "JOEY_SECRET_KEY")
    for name in names:
        monkeypatch.setenv(name, f"secret-of-{name}")
    env = settings_env(StackSettings(state_dir=tmp_path))
    for service in SERVICES:
        inherited = service_env(env, service)
        assert not [value for value in inherited.values() if value.startswith("secret-of-")], service
