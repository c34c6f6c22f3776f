"""One run, start to end, in a thread of its own: its version's zip and environment, its directory, its
token, its process group (``run_shim.py`` then ``python main.py``), its output stored line by line, its
lease renewed (from its claim on, by a thread of its own: fetching the zip and building the environment
may take longer than the lease), its timeout and kill, and its outcome.

A run's process gets only what it needs: the registry's address and TLS settings, the Kafka bootstrap
(to infer through pipelines), its token, its workspace, its task's name and arguments. Never the
service token, a database URL or any other credential of the orchestrator's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import psycopg

from joey_core import orchestrations as core
from joey_orchestrator import metrics
from joey_orchestrator.packaging import Environments, PackagingFailed
from joey_orchestrator.registry_client import RegistryClient, RegistryUnavailable
from joey_orchestrator.settings import OrchestratorSettings
from joey_orchestrator.store import ClaimedRun, OrchestratorStore

log = logging.getLogger(__name__)

SHIM = Path(__file__).with_name("run_shim.py")
MAX_LINE_BYTES = 64 * 1024
FLUSH_S = 0.2
SHIM_KILL_S = 5.0
"""How long the shim may take to kill a run's processes before the group is killed without it."""
_UNLIMITED_ZIP_FILES = 1_000_000


class RunFailed(Exception):
    """The run could not start; the message says why."""


@dataclass
class _Output:
    lines: queue.Queue[tuple[str, datetime, str]]
    unsaved: list[tuple[str, datetime, str]] = field(default_factory=list)
    """Taken from the queue, kept until the database took them."""
    next_seq: int = 1
    kept_bytes: int = 0
    dropped: bool = False


class LocalFiles:
    """The orchestrator's directory: zips by sha256, environments, runs' directories."""

    def __init__(self, settings: OrchestratorSettings, registry: RegistryClient) -> None:
        root = settings.orchestrator_dir.expanduser()
        self.zips = root / "zips"
        self.runs = root / "runs"
        for path in (self.zips, self.runs):
            path.mkdir(parents=True, exist_ok=True)
        self.environments = Environments(root, settings.pip_args, settings.packaging_timeout_s)
        self.limits = core.ZipLimits(_UNLIMITED_ZIP_FILES, settings.max_unpacked_bytes)
        self._registry = registry

    def zip(self, workspace: str, name: str, version: int, sha256: str) -> Path:
        path = self.zips / f"{sha256}.zip"
        if not path.is_file():
            self._registry.download(workspace, name, version, sha256, path)
        return path

    def extract(self, zip_path: Path, target: Path) -> None:
        shutil.rmtree(target, ignore_errors=True)
        try:
            core.extract(zip_path, target, self.limits)
        except core.BadZip as exc:
            raise RunFailed(f"cannot extract the orchestration: {exc}") from None


class _LeaseKeeper(threading.Thread):
    """Renews a run's lease every third of it from its claim until ``stop()``: while the zip downloads
    and pip builds as much as while the process runs, so a slow preparation is not taken for a dead
    orchestrator (and failed, and retried beside itself)."""

    def __init__(self, run_id: int, store: OrchestratorStore, lease_s: float) -> None:
        super().__init__(name=f"lease-{run_id}", daemon=True)
        self._run_id = run_id
        self._store = store
        self._every_s = lease_s / 3
        self._stopped = threading.Event()
        self.lost = threading.Event()
        """The run is no longer ours: its lease ran out and another orchestrator failed it."""
        self.killed = threading.Event()
        """The run's task was killed."""

    def run(self) -> None:
        while not self._stopped.wait(self._every_s) and not self.lost.is_set():
            self.renew()

    def renew(self) -> None:
        try:
            killed = self._store.renew(self._run_id)
        except psycopg.OperationalError as exc:
            # The run goes on; a lease that runs out meanwhile is noticed at the next renewal.
            log.warning("cannot renew the lease of run %d: %s", self._run_id, exc)
            return
        if killed is None:
            self.lost.set()
        elif killed:
            self.killed.set()

    def stop(self) -> None:
        self._stopped.set()


class RunSupervisor(threading.Thread):
    def __init__(
        self,
        run: ClaimedRun,
        settings: OrchestratorSettings,
        store: OrchestratorStore,
        registry: RegistryClient,
        files: LocalFiles,
    ) -> None:
        super().__init__(name=f"run-{run.id}", daemon=True)
        self.claimed = run
        self._settings = settings
        self._store = store
        self._registry = registry
        self._files = files
        self._output = _Output(queue.Queue())
        self._lease = _LeaseKeeper(run.id, store, settings.lease_s)
        self.stop_event = threading.Event()
        """Set when the orchestrator stops: the run is killed and fails (and is retried per its task)."""

    def run(self) -> None:
        run = self.claimed
        directory = self._files.runs / str(run.id)
        metrics.RUNNING.inc()
        self._lease.start()
        try:
            status, code, reason = self._run(directory)
        except (RunFailed, RegistryUnavailable, PackagingFailed) as exc:
            status, code, reason = core.FAILURE, None, str(exc)
            self._note(str(exc))
        except Exception as exc:
            log.exception("run %d failed", run.id)
            status, code, reason = core.FAILURE, None, f"internal error of the orchestrator: {exc}"
        finally:
            self._lease.stop()
            metrics.RUNNING.dec()
        try:
            self._flush()
            if self._store.finish(run.id, status, code, reason):
                metrics.RUNS_ENDED.labels(status).inc()
                log.info("run %d of %s/%s: %s %s", run.id, run.workspace, run.task, status, reason)
            self._registry.revoke_token(run.id)
        except Exception:
            # The token dies with the run anyway: it is valid only while the run is running.
            log.exception("could not record the end of run %d", run.id)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _run(self, directory: Path) -> tuple[str, int | None, str]:
        run = self.claimed
        version = self._store.version(run)
        if version is None:
            raise RunFailed(f"orchestration {run.orchestration!r} has no ready version")
        if version.status != core.READY:
            raise RunFailed(
                f"orchestration {run.orchestration!r} version {version.version} is {version.status}: "
                f"{version.packaging_log.splitlines()[-1] if version.packaging_log else 'no log'}"
            )
        zip_path = self._files.zip(run.workspace, run.orchestration, version.version, version.sha256)
        code = directory / "code"
        self._files.extract(zip_path, code)
        environment = self._files.environments.ensure(code, version.sha256)
        token = self._registry.issue_token(run.id)
        self._lease.renew()  # once more, now: a run another orchestrator failed meanwhile must not start
        if self._lease.lost.is_set():
            raise RunFailed("the run's lease ran out before it started: another orchestrator failed it")
        if self._lease.killed.is_set():
            self._note("the task was killed before the run started")
            return core.KILLED, None, "killed"
        where = self._settings.instance_id
        self._note(f"run {run.id} (attempt {run.attempt}) of version {version.version} on {where}")
        process = subprocess.Popen(
            [str(environment.python), "-I", str(SHIM), str(os.getpid()), core.MAIN],
            cwd=code,
            env=self._environment(token, directory),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        pumps = [
            threading.Thread(target=self._pump, args=(stream, name), daemon=True)
            for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
        ]
        for pump in pumps:
            pump.start()
        try:
            status, reason = self._supervise(process)
        finally:
            _signal_group(process.pid, signal.SIGKILL)  # what main.py left running ends with it
            process.wait()
            for pump in pumps:
                pump.join(5)
        exit_code = process.returncode
        if status == core.RUNNING:
            status = core.SUCCESS if exit_code == 0 else core.FAILURE
            reason = "" if exit_code == 0 else _exit_reason(exit_code)
        return status, exit_code, reason

    def _environment(self, token: str, directory: Path) -> dict[str, str]:
        settings = self._settings
        run = self.claimed
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(directory),
            "PYTHONUNBUFFERED": "1",
            "JOEY_REGISTRY_ADDR": settings.registry_addr,
            "JOEY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "JOEY_TOKEN": token,
            "JOEY_CREDENTIALS": str(directory / "no-credentials"),
            "JOEY_WORKSPACE": run.workspace,
            core.TASK_VARIABLE: run.task,
            core.RUN_VARIABLE: str(run.id),
            core.ARGS_VARIABLE: json.dumps(run.json_args),
        }
        if settings.tls:
            env["JOEY_TLS"] = "true"
        if settings.tls_ca is not None:
            env["JOEY_TLS_CA"] = str(settings.tls_ca)
        return env

    def _supervise(self, process: subprocess.Popen[bytes]) -> tuple[str, str]:
        """Until the process exits: its output flushed, its timeout, a kill and the loss of its lease
        enforced. RUNNING when it exited by itself."""
        settings = self._settings
        timeout_s = self.claimed.timeout_s
        started = time.monotonic()
        while process.poll() is None:
            time.sleep(FLUSH_S)
            try:
                self._flush()
            except psycopg.OperationalError as exc:
                # The run goes on; its lines wait. A lease that runs out meanwhile ends it below.
                log.warning("cannot store the output of run %d yet: %s", self.claimed.id, exc)
            now = time.monotonic()
            if timeout_s is not None and now - started > timeout_s:
                self._end(process, f"timed out after {timeout_s:g} s")
                return core.TIMED_OUT, f"timed out after {timeout_s:g} s"
            if self.stop_event.is_set():
                self._end(process, "the orchestrator is stopping")
                return core.FAILURE, f"orchestrator {settings.instance_id} stopped during the run"
            if self._lease.lost.is_set():
                self._end(process, "the run's lease was lost")
                return core.FAILURE, "the run's lease ran out: another orchestrator failed it"
            if self._lease.killed.is_set():
                self._end(process, "the task was killed")
                return core.KILLED, "killed"
        return core.RUNNING, ""

    def _end(self, process: subprocess.Popen[bytes], why: str) -> None:
        """SIGTERM to the run's process group, SIGKILL after the grace period: by the shim first, which
        kills its descendants outside the group too, then to the group."""
        grace = self._settings.kill_grace_s
        self._note(f"{why}: SIGTERM to the run's processes, SIGKILL in {grace:g} s")
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(SHIM_KILL_S)
            _signal_group(process.pid, signal.SIGKILL)

    def _pump(self, stream: IO[bytes], name: str) -> None:
        while line := stream.readline(MAX_LINE_BYTES):
            self._output.lines.put((name, datetime.now(UTC), line.decode(errors="replace").rstrip("\r\n")))

    def _note(self, text: str) -> None:
        self._output.lines.put(("joey", datetime.now(UTC), text))

    def _flush(self) -> None:
        output = self._output
        while True:
            try:
                self._keep(output.lines.get_nowait())
            except queue.Empty:
                break
        if output.unsaved:  # kept until the database took them: a failed write is tried again as is
            self._store.append_logs(self.claimed.id, output.next_seq, output.unsaved)
            output.next_seq += len(output.unsaved)
            output.unsaved = []

    def _keep(self, line: tuple[str, datetime, str]) -> None:
        """Keep the line unless it passes the run's limits; past them, a note and nothing more."""
        output = self._output
        if output.dropped:
            return
        settings = self._settings
        size = len(line[2].encode())
        if output.next_seq - 1 + len(output.unsaved) >= settings.max_log_lines:
            limit = f"{settings.max_log_lines} lines (JOEY_MAX_LOG_LINES)"
        elif output.kept_bytes + size > settings.max_log_bytes:
            limit = f"{settings.max_log_bytes} bytes (JOEY_MAX_LOG_BYTES)"
        else:
            output.unsaved.append(line)
            output.kept_bytes += size
            return
        output.dropped = True
        output.unsaved.append(("joey", datetime.now(UTC), f"output beyond {limit} dropped"))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"ended by {signal.Signals(-code).name}"
    return f"main.py exited with {code}"
