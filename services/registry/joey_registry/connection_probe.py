"""The child process a connection test runs in, apart from the registry.

A test connects wherever a workspace member wrote, with client libraries (libpq, librdkafka, the AWS
SDK) parsing whatever the other end answers, and may hang. Here that costs this process only: it is
started per test (``python -s -P -m joey_registry.connection_probe``) with an environment holding
nothing of the registry's (no database URL, no JOEY_SECRET_KEY, no PG* or AWS_* variable or file a
library would pick up), reads one request on stdin, tests, and writes one reply to stdout; the
registry kills it past its timeout.

Request: ``{"type", "details", "timeout_s"}``. Reply: ``{"ok", "message", "found"}``.
"""

from __future__ import annotations

import json
import os
import resource
import sys

from joey_core.connections import connection_type


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    # No core dump holding the details; under load and memory pressure the registry goes first.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.nice(10)
    report = connection_type(request["type"]).test(request["details"], float(request["timeout_s"]))
    sys.stdout.write(json.dumps({"ok": report.ok, "message": report.message, "found": report.found}))


if __name__ == "__main__":
    main()
