"""The orchestrator core: packages orchestration versions, fires schedules, claims and runs tasks' runs,
and fails the runs of orchestrators that died (docs/workloads.md, "Orchestrations and tasks").

Any number of orchestrators share the work through Postgres row locks (joey_orchestrator.store): each
loop of each process fails the runs whose lease ran out, fires every schedule's due instant (once: the
instant's row is unique), packages one waiting version, and claims pending runs up to JOEY_MAX_RUNS,
each run by a RunSupervisor thread; every PRUNE_INTERVAL_S it deletes the runs of each task past its
latest JOEY_KEEP_RUNS.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time

import psycopg
import redis

from joey_core import orchestrations as core
from joey_core.heartbeats import ServiceHeartbeat
from joey_orchestrator import metrics
from joey_orchestrator.packaging import PackagingFailed
from joey_orchestrator.registry_client import RegistryClient, RegistryUnavailable
from joey_orchestrator.runs import LocalFiles, RunFailed, RunSupervisor
from joey_orchestrator.settings import OrchestratorSettings
from joey_orchestrator.store import Backoff, OrchestratorStore

log = logging.getLogger(__name__)

SERVICE = "orchestrator"
STOP_TIMEOUT_S = 60.0
# Old runs pile up slowly (one per run), and finding them looks at every task: now and then is enough.
PRUNE_INTERVAL_S = 30.0


class Orchestrator:
    def __init__(self, settings: OrchestratorSettings, redis_client: redis.Redis | None = None) -> None:
        self._settings = settings
        backoff = Backoff(
            settings.retry_backoff_s,
            settings.retry_backoff_max_s,
            settings.continuous_backoff_s,
            settings.continuous_backoff_max_s,
        )
        self._store = OrchestratorStore(
            settings.database_url.get_secret_value(), settings.instance_id, settings.lease_s, backoff
        )
        self._registry = RegistryClient(settings)
        self._files = LocalFiles(settings, self._registry)
        self._redis = redis_client or redis.Redis.from_url(settings.redis_url.get_secret_value())
        self._heartbeat = ServiceHeartbeat(self._redis, settings, SERVICE)
        self._running: dict[int, RunSupervisor] = {}
        self._packager: threading.Thread | None = None
        self._pruned = -PRUNE_INTERVAL_S

    def run(self, stop: threading.Event) -> None:
        self._store.open()
        log.info("orchestrator %s started", self._settings.instance_id)
        try:
            while not stop.is_set():
                try:
                    self._step()
                except psycopg.OperationalError as exc:
                    # The runs go on meanwhile; those whose lease runs out are failed once it is back.
                    log.warning("the database is unavailable: %s", exc)
                else:
                    self._heartbeat.beat()
                stop.wait(self._settings.poll_interval_s)
        finally:
            log.info("orchestrator %s stopping", self._settings.instance_id)
            for supervisor in self._running.values():
                supervisor.stop_event.set()
            for supervisor in self._running.values():
                supervisor.join(STOP_TIMEOUT_S)
            self._heartbeat.retire()
            self._registry.close()
            self._store.close()

    def _step(self) -> None:
        settings = self._settings
        reaped = self._store.reap()
        metrics.RUNS_REAPED.inc(len(reaped))
        for run_id in reaped:
            self._revoke(run_id)
        metrics.FIRED.inc(self._store.fire_schedules(settings.catch_up == "last", settings.schedule_grace_s))
        now = time.monotonic()
        if now - self._pruned >= PRUNE_INTERVAL_S:
            self._pruned = now
            while self._store.prune(settings.keep_runs):
                pass
        if self._packager is None or not self._packager.is_alive():
            self._packager = threading.Thread(target=self._package, name="packager", daemon=True)
            self._packager.start()
        self._running = {i: s for i, s in self._running.items() if s.is_alive()}
        while len(self._running) < settings.max_runs:
            claimed = self._store.claim()
            if claimed is None:
                break
            log.info("claimed run %d of %s/%s", claimed.id, claimed.workspace, claimed.task)
            supervisor = RunSupervisor(claimed, settings, self._store, self._registry, self._files)
            self._running[claimed.id] = supervisor
            supervisor.start()

    def _revoke(self, run_id: int) -> None:
        try:
            self._registry.revoke_token(run_id)
        except RegistryUnavailable as exc:
            # Harmless: a run's token is refused once its run is no longer running.
            log.warning("%s", exc)

    def _package(self) -> None:
        """Package the oldest version waiting, if any, under its row's lock."""
        try:
            with self._store.packaging() as found:
                if found is None:
                    return
                job, conn = found
                log.info("packaging orchestration %s/%s version %d", job.workspace, job.name, job.version)
                directory = self._files.runs / f"package-{job.id}-{secrets.token_hex(4)}"
                try:
                    zip_path = self._files.zip(job.workspace, job.name, job.version, job.sha256)
                    self._files.extract(zip_path, directory)
                    environment = self._files.environments.ensure(directory, job.sha256)
                    status, text = core.READY, environment.log
                except (PackagingFailed, RunFailed) as exc:
                    status, text = core.ERROR, getattr(exc, "log", "") or f"error: {exc}"
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                self._store.packaged(conn, job, status, text)
                metrics.PACKAGED.labels(status).inc()
                log.info("orchestration %s/%s version %d: %s", job.workspace, job.name, job.version, status)
        except RegistryUnavailable as exc:
            # Left packaging: this or another orchestrator tries again.
            log.warning("could not package: %s", exc)
        except Exception:
            log.exception("packaging failed")
