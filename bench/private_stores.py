"""A Postgres and a Redis of the bench's own, in a temporary directory, on free ports.

The fault suite restarts them; the machine's shared Postgres (5432) and Redis (6379) serve other
people's tests at the same time and are never touched. Postgres runs as the ``postgres`` OS user
(it refuses to run as root) from the PostgreSQL 15 binaries.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _as_postgres_user() -> list[str]:
    """Postgres refuses to run as root: a root bench runs its commands as the postgres OS user."""
    return ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []


class PrivatePostgres:
    """An initdb'd cluster under ``root``, trust authentication on 127.0.0.1 only."""

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log_path = log_path
        self.port = free_port()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> PrivatePostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, PG_USER)
            # The temporary directory above it is root's and private: the postgres user must pass through.
            self.root.parent.chmod(0o711)
        subprocess.run(
            [*_as_postgres_user(), str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres"]
            + ["-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return self.start()

    def _ctl(self, *args: str) -> None:
        with self.log_path.open("ab") as out:
            subprocess.run(
                [*_as_postgres_user(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._ctl("start", "-w", "-o", options, "-l", str(self.root / "postgres.log"))
        _wait(self.ready, 30, "the private Postgres")
        return self

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def crash(self) -> None:
        """Stop as a crash would: immediate mode, every connection cut, recovery at the next start."""
        self._ctl("stop", "-m", "immediate", "-w")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", "fast", "-w")


class PrivateRedis:
    """A redis-server without persistence: a restart starts it empty, as a lost Redis host would."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [*argv, "--appendonly", "no"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait(self.ready, 30, "the private Redis")
        return self

    def ready(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
