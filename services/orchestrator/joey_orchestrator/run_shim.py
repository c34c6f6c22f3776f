"""The first process of a task's run, leader of its process group: runs ``python main.py`` and exits as
it does. Run by path with the orchestration's interpreter (never imported by the orchestrator): the
standard library only.

Why it exists: a run must not outlive its orchestrator, nor leave anything behind. The kernel tells
this process when the orchestrator dies (PR_SET_PDEATHSIG), even by SIGKILL. It is its descendants'
subreaper (PR_SET_CHILD_SUBREAPER): one that left the process group (setsid, a daemon's double fork)
is still its descendant. When main.py exits, or on SIGUSR1 (the orchestrator's hard kill) or its
orchestrator's death, it kills every descendant left, then exits. It ignores SIGTERM and SIGINT: the
orchestrator signals the whole group when it kills a run, so main.py gets them and has the grace
period to exit.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_ROUNDS = 100


def _children() -> dict[int, list[int]]:
    """Live processes by parent, from /proc (zombies left out: they wait to be reaped, nothing more)."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found.setdefault(int(fields[1]), []).append(int(entry))
    return found


def _kill_descendants() -> None:
    """SIGKILL every descendant, again until none is left: one forked between a look and its kill is
    orphaned to this process (the subreaper) and found the next round."""
    for _ in range(_ROUNDS):
        children = _children()
        descendants, todo = [], list(children.get(os.getpid(), []))
        while todo:
            pid = todo.pop()
            descendants.append(pid)
            todo += children.get(pid, [])
        if not descendants:
            return
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


def _orphaned(signum: int, frame: object) -> None:
    _kill_descendants()
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    parent = int(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGUSR1, _orphaned)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    if os.getppid() != parent:  # the orchestrator died before the death signal was armed
        _orphaned(signal.SIGUSR1, None)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(
        [sys.executable, *sys.argv[2:]],
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGINT)],
    )
    code = child.wait()
    _kill_descendants()
    if code < 0:  # ended by a signal: so is this process, for the orchestrator to see which
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


main()
