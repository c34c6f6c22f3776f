"""The one shutdown path every service shares: signals only set an event.

A service's ``serve()`` builds its settings, calls :func:`shutdown_event`, and runs its
loop until the event is set; the loop then drains in-flight work, commits and closes.
A second Ctrl-C restores the default handler so a stuck drain can still be interrupted.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

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


def configure_logging(settings: CommonSettings) -> None:
    """Log to stderr at the settings' level, with the settings' secrets scrubbed from every line, whatever
    library wrote it."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", secrets_of(settings))
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
