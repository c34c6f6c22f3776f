"""Orchestrations and tasks end to end: two `joey serve orchestrator` processes against the session's
stack, one orchestration (main.py importing a package its requirements.txt installs from a directory
of the zip) doing what each task's arguments ask: succeed, fail, hang past its timeout, leave a
grandchild behind, probe its token's reach, or wait to be crashed under."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

import joey
from joey.client import Client
from joey_core import orchestrations as core
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from tests.conftest import ServiceProcess, Stack, wait_service_ready, wait_until
from tests.joey_cli.conftest import joey as joey_cli
from tests.orchestrator.helpers import alive, package_with_backend
from tests.registry.helpers import token_stub

MAIN = """
import os, signal, subprocess, sys, time
from pathlib import Path

import joey
import tinypkg

args = joey.task_args()
client = joey.Client()
print(f"hello from {client.workspace}: {tinypkg.GREETING}")
print("variables", " ".join(sorted(k for k in os.environ if k.startswith("JOEY_"))))
mode = args.get("mode")
if mode == "fail":
    raise RuntimeError("boom: " + args["why"])
if mode == "flood":
    for i in range(2000):
        print(f"{i:05d} " + "x" * 94)
if mode == "hang":
    time.sleep(600)
if mode in ("grandchild", "orphan"):
    # A grandchild in the run's process group, and one that left it (a session of its own).
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    children = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
    Path(args["pidfile"]).write_text(" ".join(str(child.pid) for child in children))
    if mode == "grandchild":  # deaf to SIGTERM: only SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
if mode == "scope":
    print("details", client.get_connection(args["connection"]).details()["path"])
    try:
        joey.Client(workspace=args["other"]).list_models()
    except joey.JoeyError as exc:
        print("outside", exc.code)
    Path(args["tokenfile"]).write_text(os.environ["JOEY_TOKEN"])
if mode == "score":
    results = client.get_pipeline(args["pipeline"]).infer([{"features": [5.1, 3.5, 1.4, 0.2]}] * 3)
    print("scored", len(results), "failed", int(results["error"].notna().sum()))
if mode == "crash":
    marker = Path(args["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    print("second attempt")
"""

ORCHESTRATORS = {
    "JOEY_POLL_INTERVAL_S": "0.1",
    "JOEY_LEASE_S": "1.5",
    "JOEY_KILL_GRACE_S": "1",
    "JOEY_RETRY_BACKOFF_S": "0",
    "JOEY_CONTINUOUS_BACKOFF_S": "0.1",
    "JOEY_HEARTBEAT_INTERVAL_S": "0.5",
    "JOEY_MAX_LOG_BYTES": str(64 * 1024),
    # No index: the tests never reach PyPI; the local package builds with the setuptools Joey's
    # environment has.
    "JOEY_PIP_ARGS": json.dumps(["--no-index", "--no-build-isolation"]),
}


@dataclass
class World:
    client: Client
    orchestrators: dict[str, ServiceProcess]
    orchestration: joey.Orchestration
    tmp: Path
    database_url: str


def write_orchestration(root: Path, requirements: str) -> Path:
    package = root / "vendor" / "tinypkg"
    (package / "tinypkg").mkdir(parents=True)
    (package / "tinypkg" / "__init__.py").write_text('GREETING = "tinypkg says hi"\n')
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tinypkg"\nversion = "1.0"\n'
    )
    (root / "main.py").write_text(MAIN)
    (root / "requirements.txt").write_text(requirements)
    return root


@pytest.fixture(scope="module")
def world(
    stack: Stack,
    settings: CommonSettings,
    service_factory: Callable[..., ServiceProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("orchestrations")
    shared = {**ORCHESTRATORS, "JOEY_ORCHESTRATOR_DIR": str(tmp / "orchestrator")}
    orchestrators = {
        name: service_factory("orchestrator", JOEY_INSTANCE_ID=name, **shared)
        for name in ("orch-a", "orch-b")
    }
    wait_service_ready(stack.env, "orchestrator", count=2)
    with Client(settings=settings) as client:
        client.set_current_workspace(client.create_workspace(f"orch-{secrets.token_hex(3)}"))
        code = write_orchestration(tmp / "job", "./vendor/tinypkg\n")
        orchestration = client.upload_orchestration("job", code, timeout_s=120)
        yield World(client, orchestrators, orchestration, tmp, stack.env["JOEY_DATABASE_URL"])


def text(run: joey.TaskRun) -> str:
    return "\n".join(line.text for line in run.logs())


def test_bad_zips_are_refused_and_nothing_is_stored(world: World, tmp_path: Path) -> None:
    def zipped(name: str, entries: dict[str, str], links: tuple[str, ...] = ()) -> Path:
        path = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for entry, content in entries.items():
                archive.writestr(entry, content)
            for link in links:
                info = zipfile.ZipInfo(link)
                info.create_system = 3
                info.external_attr = 0o120777 << 16
                archive.writestr(info, "/etc/passwd")
        return path

    cases = {
        "no main.py": (zipped("nomain", {"job.py": "print(1)"}), "no main.py"),
        "traversal": (zipped("escape", {"main.py": "", "../../evil.py": ""}), "'..'"),
        "absolute": (zipped("absolute", {"main.py": "", "/etc/cron.d/x": ""}), "absolute"),
        "link": (zipped("link", {"main.py": ""}, ("data",)), "symbolic link"),
        "not a zip": (tmp_path / "plain.zip", "not a zip"),
    }
    (tmp_path / "plain.zip").write_text("main.py")
    for case, (path, reason) in cases.items():
        with pytest.raises(joey.JoeyError) as refused:
            world.client.upload_orchestration(f"bad-{case.replace(' ', '-').replace('.', '')}", path)
        assert refused.value.code == "INVALID_ARGUMENT", case
        assert reason in refused.value.message, (case, refused.value.message)
    assert [o.name for o in world.client.list_orchestrations()] == ["job"]


def test_bad_tasks_are_refused_and_what_a_task_uses_cannot_be_deleted(world: World) -> None:
    orch = world.orchestration

    def refused(code: str, match: str, call: Callable[[], object]) -> None:
        with pytest.raises(joey.JoeyError) as error:
            call()
        assert error.value.code == code and match in error.value.message, error.value.message

    refused("INVALID_ARGUMENT", "invalid schedule", lambda: orch.run_scheduled("s", schedule="every day"))
    refused("INVALID_ARGUMENT", "above 0 seconds", lambda: orch.run_once("t", timeout=0))
    refused("INVALID_ARGUMENT", "retries must be 0 to 100", lambda: orch.run_once("t", retries=-1))
    refused("NOT_FOUND", "orchestration 'nope'", lambda: world.client.get_orchestration("nope"))
    held = orch.run_scheduled("held", schedule="0 2 * * *")
    assert held.next_run is not None and (held.next_run.hour, held.next_run.minute) == (2, 0)
    refused("ALREADY_EXISTS", "already exists", lambda: orch.run_once("held"))
    refused("FAILED_PRECONDITION", "kill it first", held.delete)
    refused("FAILED_PRECONDITION", "used by tasks", orch.delete)
    refused(
        "FAILED_PRECONDITION", "tasks 'held'", lambda: world.client.delete_workspace(world.client.workspace)
    )
    held.kill()
    assert held.status() == "killed" and world.client.get_task("held").next_run is None
    held.delete()
    assert "held" not in world.client.list_tasks()


def test_a_requirement_that_cannot_be_installed_is_an_error_with_pips_reason(world: World) -> None:
    code = world.tmp / "broken"
    code.mkdir()
    (code / "main.py").write_text("print('never runs')\n")
    (code / "requirements.txt").write_text("no-such-package-joey-test==1.0\n")
    with pytest.raises(joey.JoeyError) as failed:
        world.client.upload_orchestration("broken", code, timeout_s=60)
    assert failed.value.code == "FAILED_PRECONDITION"
    status = world.client.get_orchestration("broken").status()
    assert status.status == "error"
    assert "no-such-package-joey-test" in status.log and "No matching distribution" in status.log


def test_runs_succeed_fail_time_out_and_are_killed_with_their_process_group(world: World) -> None:
    orch = world.orchestration
    assert orch.status().status == "ready"
    assert "tinypkg" in orch.status().log  # the install log is kept
    pidfile = world.tmp / "grandchild.pid"
    ok = orch.run_once("ok", json_args={"mode": "ok"})
    failing = orch.run_once("failing", json_args={"mode": "fail", "why": "on purpose"}, retries=1)
    hanging = orch.run_once("hanging", json_args={"mode": "hang"}, timeout=2)
    orphan_pids = world.tmp / "orphan.pids"
    orphaning = orch.run_once("orphaning", json_args={"mode": "orphan", "pidfile": str(orphan_pids)})
    doomed = orch.run_once("doomed", json_args={"mode": "grandchild", "pidfile": str(pidfile)})
    forever = orch.run_continuously("forever", json_args={"mode": "ok"})
    flooding = orch.run_once("flooding", json_args={"mode": "flood"})

    assert ok.wait(60) == "success"
    run = ok.last_runs()[0]
    assert run.exit_code == 0 and run.start is not None and run.end is not None and run.start <= run.end
    output = text(run)
    assert f"hello from {world.client.workspace}: tinypkg says hi" in output
    variables = next(line for line in output.splitlines() if line.startswith("variables")).split()[1:]
    assert "JOEY_TOKEN" in variables and "JOEY_REGISTRY_ADDR" in variables
    assert not {"JOEY_SERVICE_TOKEN", "JOEY_DATABASE_URL", "JOEY_REDIS_URL", "JOEY_SECRET_KEY"} & set(
        variables
    )

    assert failing.wait(60) == "failure"
    attempts = failing.last_runs()
    assert [(r.attempt, r.status, r.exit_code) for r in attempts] == [(2, "failure", 1), (1, "failure", 1)]
    assert "Traceback" in text(attempts[0]) and "RuntimeError: boom: on purpose" in text(attempts[0])

    # 200 kB printed, 64 KiB kept: the lines up to the limit, then a note.
    assert flooding.wait(60) == "success"
    *kept, note = [line.text for line in flooding.last_runs()[0].logs()]
    assert note == "output beyond 65536 bytes (JOEY_MAX_LOG_BYTES) dropped"
    printed = [f"{i:05d} " + "x" * 94 for i in range(2000)]
    flood = kept[kept.index(printed[0]) :]
    assert 0 < len(flood) < len(printed) and flood == printed[: len(flood)]
    stored = sum(len(text) for text in kept)
    assert stored <= 64 * 1024 < stored + len(printed[len(flood)])

    assert hanging.wait(60) == "timed_out"
    assert "timed out after 2 s" in text(hanging.last_runs()[0])
    # What main.py leaves behind when it exits ends with it, in its process group or not.
    assert orphaning.wait(60) == "success"
    orphans = [int(pid) for pid in orphan_pids.read_text().split()]
    wait_until(lambda: not any(map(alive, orphans)), 10, "the grandchildren of an ended run to be gone")

    wait_until(pidfile.exists, 60, "the grandchildren to start")
    grandchildren = [int(pid) for pid in pidfile.read_text().split()]
    assert doomed.status() == "running"
    # Its output so far is readable while it runs.
    wait_until(lambda: "tinypkg says hi" in text(doomed.last_runs()[0]), 10, "the running task's output")
    doomed.kill()
    assert doomed.wait(30) == "killed"
    wait_until(lambda: not any(map(alive, grandchildren)), 10, "the grandchildren to be gone")
    # Restarted whenever it exits, until killed.
    wait_until(lambda: sum(r.status == "success" for r in forever.last_runs()) >= 2, 60, "a restart")
    forever.kill()
    assert forever.wait(30) == "killed"
    statuses = {t.name: t.last_status for t in world.client.list_tasks()}
    assert (
        statuses.items()
        >= {
            "ok": "success",
            "failing": "failure",
            "hanging": "timed_out",
            "doomed": "killed",
            "forever": "killed",
        }.items()
    )


def test_a_task_acts_only_in_its_workspace_and_only_while_it_runs(
    world: World, settings: CommonSettings
) -> None:
    client = world.client
    client.create_connection("inbox", "files", {"path": str(world.tmp)})
    with Client(settings=settings) as admin:
        other = admin.create_workspace(f"orch-other-{secrets.token_hex(3)}").name
    tokenfile = world.tmp / "token"
    args = {"mode": "scope", "connection": "inbox", "other": other, "tokenfile": str(tokenfile)}
    task = world.orchestration.run_once("scope", json_args=args)
    assert task.wait(60) == "success"
    output = text(task.last_runs()[0])
    assert f"details {world.tmp}" in output  # a connection of its workspace, in full
    assert "outside NOT_FOUND" in output  # the admin's token, scoped: the other workspace does not exist
    stub = token_stub(grpc.insecure_channel(settings.registry_addr), tokenfile.read_text())
    with pytest.raises(grpc.RpcError) as after:
        stub.ListModels(pb.ListModelsRequest(workspace=client.workspace))
    assert after.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


PROMOTE = """
import joey

client = joey.Client()
me = joey.task_args()["me"]
print("acting as", client.whoami().username)
workspace = client.get_workspace(client.workspace)
calls = {"promote": lambda: workspace.add_owner(me), "delete": lambda: client.delete_workspace(workspace)}
for what, call in calls.items():
    try:
        call()
        print(what, "OK")
    except joey.JoeyError as exc:
        print(what, exc.code, exc.message)
"""


def test_a_collaborators_version_in_an_admins_task_acts_as_the_collaborator_and_manages_nothing(
    world: World, settings: CommonSettings
) -> None:
    admin = world.client
    collaborator, password = f"collab-{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    admin.create_user(collaborator, password)
    admin.get_workspace(admin.workspace).add_user(collaborator)
    first = world.tmp / "shared-1"
    first.mkdir()
    (first / "main.py").write_text("print('version 1')\n")
    shared = admin.upload_orchestration("shared", first, timeout_s=60)
    second = world.tmp / "shared-2"
    second.mkdir()
    (second / "main.py").write_text(PROMOTE)
    with Client.login(collaborator, password, workspace=admin.workspace, settings=settings) as theirs:
        assert theirs.upload_orchestration("shared", second, timeout_s=60).version == 2
    # The admin's task, left on the latest version: it runs the collaborator's code.
    task = shared.run_once("promote", json_args={"me": collaborator})
    assert task.wait(60) == "success"
    run = task.last_runs()[0]
    output = text(run)
    assert run.orchestration_version == 2 and f"acting as {collaborator}" in output.splitlines()
    for what in ("promote", "delete"):
        assert f"{what} PERMISSION_DENIED a task's token may not manage its workspace" in output, output
    assert dict(admin.get_workspace(admin.workspace).users())[collaborator] == "collaborator"


def test_a_task_scores_rows_through_a_deployed_pipeline(world: World, iris_model: Path) -> None:
    pipeline = world.client.build_pipeline("scored").add_model_step(
        world.client.upload_model("iris", iris_model)
    )
    pipeline.deploy(replicas=1, timeout=90)
    try:
        task = world.orchestration.run_once("batch", json_args={"mode": "score", "pipeline": "scored"})
        assert task.wait(120) == "success", text(task.last_runs()[0])
        assert "scored 3 failed 0" in text(task.last_runs()[0])
    finally:
        pipeline.undeploy()


def test_a_schedule_fires_once_per_instant_with_two_orchestrators(world: World) -> None:
    # main.py only prints, so a run ends long before the next instant: none is skipped for a run that
    # still waits (runs of one task never overlap), and every instant from the first on must run once.
    code = world.tmp / "tick"
    code.mkdir()
    (code / "main.py").write_text("print('tick')\n")
    schedule = "* * * * * */2"
    task = world.client.upload_orchestration("tick", code, timeout_s=60).run_scheduled("ticks", schedule)
    assert task.next_run is not None
    wait_until(lambda: sum(r.status == "success" for r in task.last_runs()) >= 3, 60, "three scheduled runs")
    task.kill()
    assert task.wait(30) == "killed"
    runs = sorted(task.last_runs(100), key=lambda r: r.id)
    instants = [r.instant for r in runs]
    assert None not in instants and all(r.attempt == 1 for r in runs)
    first = instants[0]
    assert first is not None and core.latest_instant(schedule, first) == first  # an instant of the schedule
    expected = [first]
    while len(expected) < len(instants):
        expected.append(core.next_instant(schedule, expected[-1]))
    assert instants == expected  # each instant once, in order, none missed from the first to the last
    assert all(r.start is None or r.instant is not None and r.start >= r.instant for r in runs)


def test_orchestrations_and_tasks_on_the_command_line(world: World, stack: Stack) -> None:
    env = os.environ | stack.env
    ws = ["-w", world.client.workspace]
    code = world.tmp / "cli-job"
    code.mkdir()
    (code / "main.py").write_text("import joey\nprint('cli says', joey.task_args()['word'])\n")
    uploaded = joey_cli(env, *ws, "orchestration", "upload", "cli-job", str(code))
    assert uploaded.stdout.strip() == "cli-job version 1 ready" and "packaging" in uploaded.stderr
    assert "Joey's packages only" in joey_cli(env, *ws, "orchestration", "status", "cli-job").stdout
    made = joey_cli(env, *ws, "task", "run-once", "cli", "-o", "cli-job", "--args", '{"word": "hi"}')
    assert made.stdout.strip() == "created task cli (once of cli-job)"
    followed = joey_cli(env, *ws, "task", "logs", "cli", "--follow").stdout
    assert "cli says hi" in followed.splitlines()
    runs = joey_cli(env, *ws, "task", "runs", "cli").stdout
    assert "success" in runs and "exit_code" in runs.splitlines()[0]


def test_a_runs_lease_is_renewed_while_its_environment_builds_and_a_lost_run_never_starts(
    world: World,
) -> None:
    # As when another machine packaged the version: the run's orchestrator builds the environment itself,
    # for longer than the lease (1.5 s), with a build backend that waits while `hold` exists.
    hold = world.tmp / "hold-build"
    code = world.tmp / "slow-build"
    wait = f"import pathlib, time\nwhile pathlib.Path({str(hold)!r}).exists():\n    time.sleep(0.05)"
    package_with_backend(code, "slowpkg", wait)
    (code / "main.py").write_text("print('main.py started')\n")
    orchestration = world.client.upload_orchestration("slow-build", code, timeout_s=120)
    for built in (world.tmp / "orchestrator" / "envs").glob("*/built.log"):
        if "slowpkg" in built.read_text():
            shutil.rmtree(built.parent)
    hold.touch()
    slow = orchestration.run_once("slow")
    lost = orchestration.run_once("lost")
    wait_until(lambda: all(t.status() == "running" for t in (slow, lost)), 60, "both runs to be claimed")
    slow_run, lost_run = slow.last_runs()[0].id, lost.last_runs()[0].id
    with psycopg.connect(world.database_url, autocommit=True) as conn:
        # What an orchestrator reaping it would do: the run is no longer its claimer's.
        conn.execute(
            "UPDATE task_runs SET status = 'failure', reason = 'reaped', lease_until = NULL WHERE id = %s",
            (lost_run,),
        )

        def three_leases_later() -> bool:
            row = conn.execute(
                "SELECT status <> 'running' OR now() - started_at > interval '4.5 s' FROM task_runs "
                "WHERE id = %s",
                (slow_run,),
            ).fetchone()
            return bool(row and row[0])

        wait_until(three_leases_later, 60, "three leases to pass")
    assert slow.status() == "running"  # still building, and not failed as a dead orchestrator's run
    hold.unlink()
    assert slow.wait(60) == "success"
    assert [r.attempt for r in slow.last_runs()] == [1] and "main.py started" in text(slow.last_runs()[0])
    # Refused by the registry (no token for a run not running) or by the lease's last check.
    refusals = ("is not running", "before it started")
    wait_until(lambda: any(r in text(lost.last_runs()[0]) for r in refusals), 60, "the lost run to give up")
    assert "main.py started" not in text(lost.last_runs()[0]).splitlines()
    assert [(r.id, r.status, r.reason) for r in lost.last_runs()] == [(lost_run, "failure", "reaped")]


def test_a_crashed_orchestrators_run_fails_and_is_retried_by_the_other(world: World) -> None:
    marker = world.tmp / "crash.marker"
    task = world.orchestration.run_once(
        "crash", json_args={"mode": "crash", "marker": str(marker)}, retries=1
    )
    wait_until(marker.exists, 60, "the first attempt to start")
    first = task.last_runs()[0]
    survivor = next(name for name in world.orchestrators if name != first.orchestrator)
    world.orchestrators[first.orchestrator].kill9()
    assert task.wait(60) == "success"
    failed, retried = sorted(task.last_runs(), key=lambda r: r.attempt)
    assert failed.status == "failure" and "stopped renewing" in failed.reason
    assert retried.orchestrator == survivor and "second attempt" in text(retried)
    # The crashed orchestrator's run did not outlive it: its process group was killed.
    wait_until(lambda: not alive(int(marker.read_text())), 10, "the orphaned run to be gone")
    # The failed run's token was revoked by the orchestrator that failed it.
    with psycopg.connect(world.database_url) as conn:
        tokens = conn.execute(
            "SELECT count(*) FILTER (WHERE revoked_at IS NOT NULL), count(*) FROM tokens WHERE run_id = %s",
            (failed.id,),
        ).fetchone()
    assert tokens == (1, 1)
