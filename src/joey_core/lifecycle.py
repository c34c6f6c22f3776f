"""The one shutdown path every service shares: signals only set an event.

A service's ``serve()`` builds its settings, calls :func:`shutdown_event`, and runs its
loop until the event is set; the loop then drains in-flight work, commits and closes.
A second Ctrl-C restores the default handler so a stuck drain can still be interrupted.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from types import FrameType, TracebackType

from joey_core.redaction import RedactingFormatter, secrets_of
from joey_core.settings import CommonSettings

log = logging.getLogger(__name__)


def shutdown_event() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return stop


_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """Make this process non-dumpable before it reads a secret: its environment and memory are then out
    of reach through /proc (and ptrace) for other processes of the same user, python steps included.
    Removing variables from os.environ would not do it: /proc/<pid>/environ keeps the start environment."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def configure_logging(settings: CommonSettings) -> None:
    """Log to stderr at the settings' level, with the settings' secrets scrubbed from every line, whatever
    library wrote it."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", secrets_of(settings))
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])

    # Uncaught exceptions too go through the formatter: Python's own traceback printer scrubs nothing.
    def uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.critical("uncaught exception", exc_info=(kind, exc, tb))

    def uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            log.critical(
                "uncaught exception in thread %s",
                args.thread.name if args.thread else "?",
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            )

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread
