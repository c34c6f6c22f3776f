"""A background round run every few seconds, best effort: the autoscaler's and the reconciler's thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``work()`` every ``interval_s`` on a thread of its own, from :meth:`start` until :meth:`stop`.
    A call that raises is logged and the next one runs anyway."""

    def __init__(self, name: str, interval_s: float, work: Callable[[], None]) -> None:
        self._name = name
        self._interval_s = interval_s
        self._work = work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._work()
            except Exception:
                log.exception("a round of the %s failed", self._name)
