"""Process hardening every service applies at start."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import ctypes
from joey_core.lifecycle import harden_process
prctl = ctypes.CDLL(None, use_errno=True).prctl
before = prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
harden_process()
print(before, prctl(3, 0, 0, 0, 0))
"""


def test_a_hardened_process_is_not_dumpable() -> None:
    """Non-dumpable: its /proc/<pid>/environ and memory are closed to other processes of its user."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "0"]
