"""Each replica runs in a child process of its own, supervised by the engine.

Replicas are CPU-bound Python: as threads of one process they would share one core through
the GIL. A process per replica also keeps a replica that crashes or hangs from taking the
engine or other pipelines with it. The child is started with the "spawn" method (a fresh
interpreter, nothing inherited from the engine's threads or Kafka clients), gets everything
it needs pickled in a :class:`ReplicaSpec`, loads the models from the engine's artifact
cache and runs a :class:`~joey_engine.worker.ReplicaWorker`.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import redis

from joey_core import heartbeats, lifecycle
from joey_engine.deployment import Deployment
from joey_engine.pipeline import PipelineRunner
from joey_engine.runtime import create_runtime
from joey_engine.settings import EngineSettings
from joey_engine.worker import Counter, ReplicaWorker

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4

ORPHANED_EXIT_CODE = 3
"""Exit code of a replica that exited because its engine died."""


@dataclass(frozen=True)
class ReplicaSpec:
    settings: EngineSettings
    deployment: Deployment
    artifacts: tuple[Path, ...]
    """The local file of each model to load, in the order of ``Deployment.artifact_steps``."""
    replica_id: str


def load_runner(
    settings: EngineSettings, deployment: Deployment, artifacts: Sequence[Path]
) -> PipelineRunner:
    """Every step's runtime loaded; python steps' sandboxes start side by side, and while the
    other models load, since each spends most of its start importing in a process of its own."""
    steps = list(zip(deployment.artifact_steps, artifacts, strict=True))
    runtimes = [create_runtime(step.framework, settings) for step, _ in steps]
    try:
        # Those that start processes first, so those processes start while the rest load here.
        order = sorted(range(len(steps)), key=lambda i: steps[i][0].framework != "python")
        for i in order:
            runtimes[i].start_loading(steps[i][1], steps[i][0])
        for runtime in runtimes:
            runtime.finish_loading()
    except BaseException:
        for runtime in runtimes:
            runtime.close()
        raise
    return PipelineRunner(deployment, runtimes)


def loading_detail(deployment: Deployment) -> str:
    """What loading this deployment's replica involves, for its heartbeat: "loading 1 model, starting
    1 python step sandbox"."""
    frameworks = [step.framework for step in deployment.artifact_steps]
    python = frameworks.count("python")
    models = len(frameworks) - python
    parts = [f"loading {models} model{'s' if models != 1 else ''}"] if models else []
    if python:
        parts.append(f"starting {python} python step sandbox{'es' if python != 1 else ''}")
    return ", ".join(parts)


class ReplicaProcess:
    """The engine's handle on one replica's child process."""

    def __init__(self, spec: ReplicaSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self.replica_id = spec.replica_id
        # Closing our end of the control pipe asks the replica to stop.
        control, self._control = context.Pipe(duplex=False)
        self._reports, reports = context.Pipe(duplex=False)
        # Written only by the child, read here: an aligned int needs no lock.
        self._assignments = context.Value("i", 0, lock=False)
        # Set by the child once it reports itself in Redis; until then its engine reports it as starting.
        self._reported = context.Value("i", 0, lock=False)
        self._process = context.Process(
            target=_main,
            args=(spec, control, reports, self._assignments, self._reported),
            name=f"replica-{spec.replica_id}",
            daemon=True,
        )
        self._child_ends = (control, reports)
        self._error: str | None = None
        self.pid: int | None = None

    def start(self) -> ReplicaProcess:
        self._process.start()
        self.pid = self._process.pid
        # Only the child holds these now, so its exit shows as end-of-file on our ends.
        for end in self._child_ends:
            end.close()
        return self

    def stop(self) -> None:
        """Ask the replica to finish its batch, commit, leave the group and exit."""
        self._control.close()

    def kill(self) -> None:
        self._process.kill()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the process to end; True when it has."""
        self._process.join(timeout)
        return not self.running

    def close(self) -> None:
        """Release the handle's resources; only once the process ended."""
        self._error = self.error
        self._control.close()
        self._reports.close()
        self._process.close()

    @property
    def running(self) -> bool:
        return self._process.is_alive()

    @property
    def reported(self) -> bool:
        """Whether the replica has published a heartbeat of its own (its process is up)."""
        return bool(self._reported.value)

    @property
    def assignments(self) -> int:
        """How many times the group assigned partitions to this replica (a new one after every rebalance)."""
        return int(self._assignments.value)

    @property
    def error(self) -> str | None:
        """Why the replica ended, once it ended other than by a clean stop."""
        if self._error is not None or self._reports.closed:
            return self._error
        code = self._process.exitcode
        if not code:
            return None
        try:
            if self._reports.poll():
                self._error = str(self._reports.recv())
        except (EOFError, OSError):
            pass
        if self._error is None:
            self._error = (
                f"replica process killed by {signal.Signals(-code).name}"
                if code < 0
                else f"replica process exited with code {code}"
            )
        return self._error


def _main(
    spec: ReplicaSpec, control: Connection, reports: Connection, assignments: Counter, reported: Counter
) -> None:
    """The child process: serve until the engine asks to stop, exit at once if the engine dies."""
    stop = threading.Event()
    # Ctrl-C in a terminal, or a service manager's SIGTERM, may reach the whole process group. Only the
    # engine decides when replicas stop (through the control pipe), so that they leave their group one
    # at a time; a stuck engine is still ended by the manager's SIGKILL, and its replicas follow it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    lifecycle.configure_logging(spec.settings)
    # Its python steps' sandboxes run as the same user unless told otherwise: they must not read this
    # process's memory or environment (settings, credentials) through /proc.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    threading.Thread(target=_watch, args=(control, stop), name="engine-watch", daemon=True).start()
    error = _serve(spec, stop, assignments, reported)
    if error is not None:
        reports.send(error)
        sys.exit(1)


def _watch(control: Connection, stop: threading.Event) -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        raise RuntimeError("a replica runs only as a child of the engine")
    ready = wait([parent.sentinel, control])
    if parent.sentinel not in ready:
        stop.set()
        return
    # The engine is gone (even kill -9 ends here): exit now, neither committing nor leaving the group.
    # Everything committed so far was produced and acknowledged first, and the rest is replayed by the
    # partitions' next owner once the broker expires this member's session, as if the replica had been
    # killed with the engine. Leaving gracefully instead would make all replicas of a deployment leave
    # at the same moment, which the embedded broker can wedge on (see Engine._stop).
    log.warning("engine process %d died; replica %s exits", parent.pid, os.getpid())
    os._exit(ORPHANED_EXIT_CODE)


def _serve(spec: ReplicaSpec, stop: threading.Event, assignments: Counter, reported: Counter) -> str | None:
    deployment, settings = spec.deployment, spec.settings
    # Every batch talks to Redis (attempt notes, heartbeats): a hung server must cost a bounded wait,
    # not stall the loop for good.
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    try:
        reported.value = 1  # before publishing, so the engine's "starting" never follows "loading"
        started = time.monotonic()
        loaded = threading.Event()
        # Loading can outlast a heartbeat's TTL (big models, python steps starting): keep saying so,
        # or the replica would read as dead until its worker's first beat.
        beats = threading.Thread(target=_announce_loading, args=(spec, client, loaded), daemon=True)
        beats.start()
        try:
            runner = load_runner(settings, deployment, spec.artifacts)
        except Exception as exc:
            error = f"cannot load {deployment}: {exc}"
            log.error("%s", error)
            return error
        finally:
            loaded.set()
            beats.join()
        log.info(
            "replica %s of %s loaded models %s in process %d in %.2f s",
            spec.replica_id,
            deployment,
            [f"{s.model} v{s.version}" for s in deployment.artifact_steps],
            os.getpid(),
            time.monotonic() - started,
        )
        return ReplicaWorker(settings, deployment, runner, client, spec.replica_id, stop, assignments).run()
    finally:
        client.close()


def _announce_loading(spec: ReplicaSpec, client: redis.Redis, loaded: threading.Event) -> None:
    """Say the replica is loading, which can take seconds (python steps start processes), until ``loaded``."""
    deployment, settings = spec.deployment, spec.settings
    beat = heartbeats.ReplicaHeartbeat(
        spec.replica_id,
        deployment.deployment_id,
        deployment.pipeline_version,
        loaded=False,
        host=socket.gethostname(),
        phase="loading",
        detail=loading_detail(deployment),
    )
    while True:
        try:
            heartbeats.publish(
                client,
                settings.redis_prefix,
                deployment.workspace,
                deployment.pipeline,
                beat,
                settings.heartbeat_ttl_s,
            )
        except redis.RedisError as exc:
            log.warning("cannot publish the loading heartbeat of replica %s: %s", spec.replica_id, exc)
        if loaded.wait(settings.heartbeat_ttl_s / 3):
            return
