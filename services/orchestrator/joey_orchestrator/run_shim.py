"""The first process of a task's run, leader of its process group: runs ``python main.py`` and exits as
it does. Run by path with the orchestration's interpreter (never imported by the orchestrator): the
standard library only.

Why it exists: a run must not outlive its orchestrator. The kernel tells this process when the
orchestrator dies (PR_SET_PDEATHSIG), even by SIGKILL, and it then kills its whole process group, the
grandchildren main.py started included. It ignores SIGTERM and SIGINT: the orchestrator signals the
whole group when it kills a run, so main.py gets them and has the grace period to exit.
"""

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _orphaned(signum: int, frame: object) -> None:
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    parent = int(sys.argv[1])
    signal.signal(signal.SIGUSR1, _orphaned)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    if os.getppid() != parent:  # the orchestrator died before the death signal was armed
        _orphaned(signal.SIGUSR1, None)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(
        [sys.executable, *sys.argv[2:]],
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGINT)],
    )
    code = child.wait()
    if code < 0:  # ended by a signal: so is this process, for the orchestrator to see which
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


main()
