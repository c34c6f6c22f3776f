"""Admission and deadlines of uploads, so that uploads cannot take the threads other calls need.

grpc's synchronous server has one thread pool, and a streaming upload holds a thread for as long as
its client takes to send. So uploads are admitted up to a fixed number at once, and one more is
refused at once (RESOURCE_EXHAUSTED) rather than queued: the pool's other threads stay free for every
other call. An admitted upload's messages are read by a thread of its own, so that the handler can
wait for each with a timeout (grpc's request iterator has none) and cut off a client that stalls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from joey_registry.errors import DeadlineExceeded, ResourceExhausted

log = logging.getLogger(__name__)

T = TypeVar("T")

_END = object()
# Messages read ahead of the handler: enough to overlap the network with the disk, few enough that a
# handler slower than its client holds little (a message is at most 16 MiB).
_READ_AHEAD = 2
# How often a reader blocked on a full queue looks whether its handler gave up.
_PUT_POLL_S = 0.5


class UploadGate:
    def __init__(self, concurrency: int, per_caller: int, idle_timeout_s: float, deadline_s: float) -> None:
        self.concurrency = concurrency
        self.per_caller = per_caller
        self.idle_timeout_s = idle_timeout_s
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # slots held by caller, so that no one caller takes them all

    @contextmanager
    def admitted(self, caller: str) -> Iterator[None]:
        """Hold one of the upload slots for ``caller``; ResourceExhausted when none is free, or when the
        caller holds its share already (never waits)."""
        with self._lock:
            if self._held.get(caller, 0) >= self.per_caller:
                log.warning("refused an upload of %s: it is sending %d already", caller, self.per_caller)
                raise ResourceExhausted(
                    f"you are sending {self.per_caller} uploads already (JOEY_UPLOAD_PER_CALLER); "
                    "retry when one has finished"
                )
            if sum(self._held.values()) >= self.concurrency:
                log.warning("refused an upload: %d are running already", self.concurrency)
                raise ResourceExhausted(
                    f"the registry is receiving {self.concurrency} uploads already "
                    "(JOEY_UPLOAD_CONCURRENCY); retry when one has finished"
                )
            self._held[caller] = self._held.get(caller, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._held[caller] -= 1
                if not self._held[caller]:
                    del self._held[caller]

    @contextmanager
    def receive(self, requests: Iterator[T]) -> Iterator[Iterator[T]]:
        """The messages of ``requests``, each within the idle timeout and all within the deadline, else
        DeadlineExceeded. Leaving the block stops the reader (the RPC's end wakes one blocked in grpc)."""
        receiver = _Receiver(requests, self.idle_timeout_s, time.monotonic() + self.deadline_s)
        try:
            yield receiver
        finally:
            receiver.stop.set()


class _Receiver(Generic[T]):
    def __init__(self, requests: Iterator[T], idle_timeout_s: float, deadline: float) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._deadline = deadline
        self._queue: queue.Queue[object] = queue.Queue(_READ_AHEAD)
        self.stop = threading.Event()
        threading.Thread(target=self._read, args=(requests,), name="upload-reader", daemon=True).start()

    def _read(self, requests: Iterator[T]) -> None:
        try:
            for message in requests:
                if not self._put(message):
                    return
        except BaseException as exc:  # the handler raises it: a cancelled call, a bad message
            self._put(exc)
            return
        self._put(_END)

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Receiver[T]:
        return self

    def __next__(self) -> T:
        left = self._deadline - time.monotonic()
        try:
            item = self._queue.get(timeout=max(0.0, min(self._idle_timeout_s, left)))
        except queue.Empty:
            if left <= self._idle_timeout_s:
                raise DeadlineExceeded(
                    "the upload did not arrive within its deadline (JOEY_UPLOAD_DEADLINE_S); "
                    "nothing was stored"
                ) from None
            raise DeadlineExceeded(
                f"the upload sent nothing for {self._idle_timeout_s:g} s (JOEY_UPLOAD_IDLE_TIMEOUT_S); "
                "nothing was stored"
            ) from None
        if item is _END:
            self._queue.put(_END)  # a later next() ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]
