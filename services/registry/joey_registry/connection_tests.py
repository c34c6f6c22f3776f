"""Running a connection test in a child process (:mod:`joey_registry.connection_probe`), bounded in
time and in number, after the registry's policy allowed what it would reach."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from joey_core import redaction
from joey_core.connections import Report, TestPolicy, TestRefused, connection_type
from joey_registry import connection_probe
from joey_registry.errors import FailedPrecondition, ResourceExhausted

log = logging.getLogger(__name__)

# What the probe sees of the environment. Files libraries read by default point nowhere: the
# registry's ~/.pgpass, ~/.aws or a service file must never lend it credentials.
_PROBE_ENVIRONMENT = {
    "PATH": os.defpath,
    "LC_ALL": "C.UTF-8",
    "HOME": "/nonexistent",
    "PGPASSFILE": os.devnull,
    "PGSERVICEFILE": os.devnull,
    "PGSYSCONFDIR": "/nonexistent",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_GRACE_S = 5.0
"""Beyond the test's own timeout: the interpreter's start and imports."""
_STDERR_LOGGED = 2000


class ConnectionTests:
    def __init__(self, policy: TestPolicy, timeout_s: float, concurrency: int) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(concurrency)
        self.concurrency = concurrency

    def run(self, kind: str, details: Mapping[str, Any], secrets: Iterable[str]) -> Report:
        """The test's report, its message scrubbed of ``secrets``; FailedPrecondition when the policy
        refuses what it would reach, ResourceExhausted when tests take every slot."""
        try:
            self.policy.check(connection_type(kind).probe(details))
        except TestRefused as exc:
            raise FailedPrecondition(str(exc)) from None
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the registry is running {self.concurrency} connection tests already "
                "(JOEY_CONNECTION_TEST_CONCURRENCY); retry when one has finished"
            )
        hidden = sorted({s for s in secrets if s}, key=len, reverse=True)
        try:
            report = self._probe(kind, details, hidden)
        finally:
            self._slots.release()
        return Report(report.ok, redaction.scrub(report.message, hidden), report.found)

    def _probe(self, kind: str, details: Mapping[str, Any], hidden: list[str]) -> Report:
        request = json.dumps({"type": kind, "details": dict(details), "timeout_s": self.timeout_s})
        child = subprocess.Popen(
            [sys.executable, "-s", "-P", "-m", connection_probe.__name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_PROBE_ENVIRONMENT | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            cwd="/",
        )
        try:
            out, err = child.communicate(request.encode(), timeout=self.timeout_s + _GRACE_S)
        except subprocess.TimeoutExpired:
            return Report(
                False, f"the test took longer than {self.timeout_s:g} s (JOEY_CONNECTION_TEST_TIMEOUT_S)"
            )
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        if child.returncode != 0:
            # A bug or a crash of a client library; its stderr may quote the details, scrubbed here.
            tail = redaction.scrub(err[-_STDERR_LOGGED:].decode(errors="replace"), hidden)
            log.warning("a %s connection test exited with status %d: %s", kind, child.returncode, tail)
            return Report(False, f"the test failed (exit status {child.returncode}); see the registry log")
        reply = json.loads(out)
        return Report(bool(reply["ok"]), str(reply["message"]), dict(reply["found"]))
