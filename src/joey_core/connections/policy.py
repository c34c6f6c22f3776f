"""Where a connection test may reach: the registry's guard against server-side request forgery.

A test makes the registry connect wherever a workspace member wrote: its own database, a cloud
metadata endpoint, a service on its private network. So a test runs only when every host it names is
allowed by JOEY_CONNECTION_TEST_HOSTS and every directory lies under JOEY_CONNECTION_TEST_DIRS; both
are empty by default, so tests are refused until an admin allows them.

Host entries: a name (``db.example.com``, case-insensitive), a wildcard (``*.example.com``), an
address or network (``10.0.0.0/8``, ``::1``), or ``*`` for any host. Names are never resolved to match
a network: a name is allowed by a name entry only (resolving first could be rebound afterwards).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass

from joey_core.connections.base import Probe


class TestRefused(Exception):  # noqa: N818 (a refusal, not a failure)
    __test__ = False  # not a pytest class


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class TestPolicy:
    __test__ = False

    hosts: tuple[str, ...] = ()
    directories: tuple[str, ...] = ()

    @classmethod
    def of(cls, hosts: Iterable[str], directories: Iterable[str]) -> TestPolicy:
        return cls(
            tuple(h.strip().lower() for h in hosts if h.strip()),
            tuple(os.path.realpath(d.strip()) for d in directories if d.strip()),
        )

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        address = _address(host)
        for entry in self.hosts:
            if entry == "*":
                return True
            if address is not None:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    continue  # a name entry: it allows names only
            elif _address(entry) is None and "/" not in entry and fnmatch.fnmatchcase(host, entry):
                return True
        return False

    def directory_allowed(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.directories)

    def check(self, probe: Probe) -> None:
        """TestRefused naming the first host or directory not allowed."""
        for host in probe.hosts:
            if not self.host_allowed(host):
                allowed = ", ".join(self.hosts) or "none"
                raise TestRefused(
                    "connection tests may reach only the hosts of JOEY_CONNECTION_TEST_HOSTS "
                    f"(now: {allowed}); {host!r} is not one of them: ask a registry admin to allow it"
                )
        for directory in probe.directories:
            if not self.directory_allowed(directory):
                allowed = ", ".join(self.directories) or "none"
                raise TestRefused(
                    "connection tests may read only directories under JOEY_CONNECTION_TEST_DIRS "
                    f"(now: {allowed}); {directory!r} is not under one: ask a registry admin to allow it"
                )
