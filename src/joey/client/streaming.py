"""Client side of the streaming path: send records to a pipeline's input topic and collect the matching
outputs and errors by request id, over a connection kept across calls.

A :class:`PipelineStream` holds one producer and one :class:`~joey_core.replies.ReplyReader` of a
pipeline; a client's :class:`Streams` makes one per pipeline on its first call and keeps it until the
client closes (or the interpreter exits), so a call costs one trip through the pipeline, not a
connection's set-up. The reader is positioned when the stream is made, before anything is produced, so
no reply can be missed. The embedded broker under-reports high-watermarks, which only means some older
replies are read and skipped; on real Kafka the positions are exact.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer

from joey.client.calls import JoeyError, RegistryCaller
from joey.client.inputs import InputError
from joey_core.kafka import PURGE_REPORTS_S, is_fatal, producer_config
from joey_core.records import REQUEST_ID_HEADER, dumps
from joey_core.replies import Call, Reply, ReplyReader, failed_reply
from joey_core.settings import CommonSettings
from joey_core.topics import PipelineTopics, pipeline_topics

log = logging.getLogger(__name__)

T = TypeVar("T")

Progress = Callable[[int, int], None]
"""Called with (answered, total) as replies arrive."""

MAX_TIMEOUT_S = 3600.0
"""The longest ``timeout`` a call takes (InputError past it): a call's sending time must end before any of
its records' delivery can time out."""

DELIVERY_TIMEOUT_S = MAX_TIMEOUT_S + 60
"""How long the producer tries to deliver a record (librdkafka's message.timeout.ms). Longer than any
call's sending time, so that a record still queued when that is up is purged (known never to have left)
rather than timed out (which a record in flight also is)."""

PRODUCER_DEFAULTS: dict[str, Any] = {
    # Latency first: a lone record leaves at once; records queued while a request is in flight still
    # go out together, so a bulk call is batched all the same.
    "linger.ms": 0,
    # Bounds what a bulk call holds in librdkafka's queue; producing waits for deliveries past it.
    "queue.buffering.max.messages": 20_000,
    "message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
}
"""Settings of the SDK's producer that JOEY_KAFKA_CONFIG may override."""

_WAKE_S = 0.1
"""How often a waiting call reports progress and checks that its reader still runs."""


class InferenceTimeout(TimeoutError):
    """Not every record was answered in time. ``replies`` has one entry per record, in order: its reply
    (a failed one for a record that was not sent), or None for a record sent and not answered yet.
    ``request_ids`` are the records' ids, in order; ``unsent`` the positions of the records known never
    to have left (safe to send again), ``pending`` those that may have reached the pipeline (sent, or
    their delivery unknown) and are not answered: sending them again may process them twice."""

    def __init__(
        self, replies: list[Reply | None], timeout: float, request_ids: list[str], unsent: set[str]
    ) -> None:
        answered = sum(r is not None for r in replies)
        super().__init__(
            f"{answered} of {len(replies)} records answered within {timeout:.0f}s; "
            "is the pipeline deployed and ready? (check `joey pipeline status`)"
        )
        self.answered = answered
        self.total = len(replies)
        self.replies = replies
        self.request_ids = request_ids
        self.unsent = [i for i, r in enumerate(request_ids) if r in unsent]
        self.pending = [i for i, reply in enumerate(replies) if reply is None]


def check_rows(rows: Sequence[Any]) -> None:
    for index, row in enumerate(rows):
        if not isinstance(row, dict | bytes):
            raise InputError(
                f"record {index} is a {type(row).__name__}, not a dict mapping input names to values "
                "(e.g. {'features': [5.1, 3.5, 1.4, 0.2]}); Pipeline.infer also takes a pandas DataFrame "
                "or a numpy array and shapes it for the pipeline's input"
            )


class _Sending:
    """One call's records that the producer has not reported on yet, and those known never to have left."""

    def __init__(self) -> None:
        self.unreported = 0
        self.unsent: set[str] = set()
        self.waiting = True
        """False once the call returned: its records still queued no longer keep other calls from purging."""


class _Retired(Exception):
    """The stream was closed as idle before this call began: nothing was sent, the caller takes a new one."""


class PipelineStream:
    """One pipeline's connection: a producer of its inputs topic and a reader of its replies, shared by
    every call (from any thread) until :meth:`close`. Raise LookupError when the pipeline's topics do
    not exist."""

    def __init__(self, settings: CommonSettings, topics: PipelineTopics) -> None:
        self.topics = topics
        self.reader = ReplyReader(settings, topics, logging.DEBUG)
        defaults = {k: v for k, v in PRODUCER_DEFAULTS.items() if k not in settings.kafka_config}
        self._producer_config = producer_config(settings, **defaults)
        self.producer = Producer(self._producer_config)
        self._spent: list[Producer] = []
        """Replaced producers whose reports are still due: polled until they have none."""
        self._failed: Producer | None = None
        """The producer when it reported a fatal error: the next produce replaces it."""
        # Guards the counts below, and makes "this call alone has records queued" and the purge that
        # follows one step that no other call's produce can come between.
        self._lock = threading.Lock()
        self._unreported = 0
        """Records of calls still waiting that the producer has not reported on."""
        self._calls = 0
        self._idle_since = time.monotonic()
        self._closed: str | None = None
        """Why calls are refused, once closed."""
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name=f"deliveries-{topics.inputs}", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        # Serves delivery reports; a failed one fails its row at once, a call need not wait to learn it.
        while not self._stop.is_set():
            self.producer.poll(_WAKE_S)
            for spent in list(self._spent):
                spent.poll(0)
                if len(spent) == 0:
                    self._spent.remove(spent)

    def _renew_producer(self, why: str) -> None:
        """Replace the producer (the lock held); its records still due are reported all the same.

        Done after a purge, as well as after a fatal error: an idempotent producer that purged records
        bumps its epoch, which the embedded broker answers by fencing it for good."""
        log.debug("new producer for %s: %s", self.topics.inputs, why)
        self._spent.append(self.producer)
        self.producer = Producer(self._producer_config)

    @property
    def alive(self) -> bool:
        return self.reader.alive and self._poller.is_alive()

    def retire_if_idle(self, idle_s: float) -> bool:
        """Refuse new calls (True) when no call is running and none ran for ``idle_s``; :meth:`close`
        follows. An idle stream holds its reader's assignments (see docs/reliability.md) and threads."""
        with self._lock:
            if self._closed is None and self._calls == 0 and time.monotonic() - self._idle_since >= idle_s:
                self._closed = "retired"
            return self._closed == "retired"

    def _check_open(self) -> None:
        if self._closed == "retired":
            raise _Retired
        if self._closed is not None:
            raise JoeyError("FAILED_PRECONDITION", self._closed)

    def infer(
        self, rows: Sequence[dict[str, Any] | bytes], timeout: float = 60.0, progress: Progress | None = None
    ) -> list[Reply]:
        """Send ``rows`` (one input record each; bytes are sent as they are); return replies in order.

        Raise InputError, having sent nothing, when a row is neither a dict nor bytes: the engine would
        refuse each such record alone. See :meth:`infer_chunks` for the rest."""
        check_rows(rows)
        return self.infer_chunks([rows], len(rows), timeout, progress)

    def infer_chunks(
        self,
        chunks: Iterable[Sequence[dict[str, Any] | bytes]],
        total: int,
        timeout: float = 60.0,
        progress: Progress | None = None,
    ) -> list[Reply]:
        """Send the rows of ``chunks`` (``total`` of them, each a dict or bytes), converted and encoded
        one chunk at a time; return one reply per row, in order.

        Any number of rows: when the producer's queue is full this waits for deliveries to free it, so
        memory stays bounded by the queue and a chunk. Sending takes at most ``timeout``, and waiting for
        replies ``timeout`` more. A row that did not leave (refused as too large, the broker refusing it,
        or still queued when the time is up) is a failed reply of its own saying it was not sent, and is
        not waited for; a row whose delivery timed out may have reached the pipeline and is waited for.
        (Rows still queued when the time is up are purged only when no other call on this stream has
        records queued: a purge takes the whole queue. Otherwise they are waited for, like rows in flight.)
        """
        if timeout > MAX_TIMEOUT_S:
            raise InputError(f"timeout is {timeout:.0f}s, more than the {MAX_TIMEOUT_S:.0f}s a call may take")
        request_ids = [uuid.uuid4().hex for _ in range(total)]
        call = Call(request_ids)
        if not request_ids:
            return []
        sending = _Sending()
        with self._lock:
            self._check_open()
            self._calls += 1
        shown = [-1]

        def report() -> None:
            if progress is not None and len(call.replies) != shown[0]:
                shown[0] = len(call.replies)
                progress(shown[0], total)

        self.reader.expect(call)
        try:
            sending_until = time.monotonic() + timeout
            ids = iter(request_ids)
            for row in itertools.chain.from_iterable(chunks):
                request_id = next(ids)
                if not self._produce(call, sending, request_id, row, sending_until):
                    for unsent in [request_id, *ids]:
                        sending.unsent.add(unsent)
                        call.deliver(
                            not_sent(unsent, "the producer's queue stayed full (is the broker reachable?)")
                        )
                    break
                if len(call.replies) != shown[0]:
                    report()
            if not self._wait(call, sending_until, report, until_reported=sending):
                self._purge_if_alone(sending)
            if not self._wait(call, time.monotonic() + timeout, report):
                raise InferenceTimeout(
                    [call.replies.get(r) for r in request_ids], timeout, request_ids, sending.unsent
                )
        finally:
            self.reader.forget(call)
            with self._lock:
                self._calls -= 1
                self._idle_since = time.monotonic()
                sending.waiting = False
                self._unreported -= sending.unreported
        report()
        return [call.replies[request_id] for request_id in request_ids]

    def _produce(self, call: Call, sending: _Sending, request_id: str, row: Any, until: float) -> bool:
        """Produce one row; False when the producer's queue stayed full until ``until``."""
        value = row if isinstance(row, bytes) else dumps(row)
        key = request_id.encode()

        def delivered(err: KafkaError | None, _: Any) -> None:
            with self._lock:
                sending.unreported -= 1
                if sending.waiting:
                    self._unreported -= 1
                if err is not None and is_fatal(err) and producer is self.producer:
                    self._failed = producer
            # A row whose delivery timed out may have reached the pipeline unacknowledged: it stays
            # pending, so the reply of a record the pipeline did process is not hidden by a failure.
            if err is not None and err.code() != KafkaError._MSG_TIMED_OUT:  # noqa: SLF001 (librdkafka's local codes)
                sending.unsent.add(request_id)
                call.deliver(not_sent(request_id, str(err)))

        while True:
            with self._lock:
                self._check_open()
                if self._failed is self.producer:
                    self._renew_producer("the last one failed for good")
                producer = self.producer
                try:
                    producer.produce(
                        self.topics.inputs,
                        value,
                        key,
                        headers=[(REQUEST_ID_HEADER, key)],
                        on_delivery=delivered,
                    )
                except BufferError:
                    pass
                except KafkaException as exc:  # refused at once: too large, a fatal producer
                    if is_fatal(exc.args[0]):
                        self._failed = producer
                    sending.unsent.add(request_id)
                    call.deliver(not_sent(request_id, str(exc.args[0])))
                    return True
                else:
                    sending.unreported += 1
                    self._unreported += 1
                    return True
            if time.monotonic() >= until:
                return False
            producer.poll(_WAKE_S)  # serves delivery reports, which frees room in the queue

    def _wait(
        self, call: Call, until: float, report: Callable[[], None], until_reported: _Sending | None = None
    ) -> bool:
        """Wait until ``call`` has all its replies (True) or ``until`` (False); with ``until_reported``,
        also stop (False) as soon as the producer has reported on every row of the call."""
        while not call.done.wait(max(min(until - time.monotonic(), _WAKE_S), 0)):
            report()
            if self._closed is not None:
                raise JoeyError("FAILED_PRECONDITION", self._closed)
            if not self.reader.alive:
                raise JoeyError(
                    "UNAVAILABLE",
                    f"the reader of {self.topics.outputs} stopped (its log says why); call infer again, "
                    "which starts a new one",
                )
            if time.monotonic() >= until or (until_reported is not None and until_reported.unreported == 0):
                return False
        return True

    def _purge_if_alone(self, sending: _Sending) -> None:
        """Fail the call's rows still queued as not sent, by purging the queue, when no other waiting call
        has rows queued (the queue may also hold rows of calls that gave up: they would only arrive late)."""
        with self._lock:
            alone = 0 < sending.unreported == self._unreported
            if alone:
                purged = self.producer
                purged.purge(in_queue=True, in_flight=False)
                self._renew_producer("the last one purged its queue")
        if alone:
            # The purged rows' reports (_PURGE_QUEUE) fail them; served by the poller, soon.
            deadline = time.monotonic() + PURGE_REPORTS_S
            while sending.unreported and time.monotonic() < deadline:
                purged.poll(_WAKE_S)

    def close(self, reason: str = "this client is closed: make a new joey.Client to infer") -> None:
        """Stop the reader and producer; calls running or made after this raise JoeyError(``reason``)."""
        with self._lock:
            if self._closed is None:
                self._closed = reason
        self.reader.close()
        self._stop.set()
        self._poller.join(5)
        # Whatever is still queued belongs to calls that gave up: it would only reach the pipeline late.
        for producer in [self.producer, *self._spent]:
            producer.purge(in_queue=True, in_flight=False)
            producer.flush(PURGE_REPORTS_S)


class Streams:
    """A client's streams, one per pipeline, made on the first call, replaced when one stopped and closed
    once idle for ``idle_s``; and the last deployment status each pipeline's calls saw, kept for
    ``status_cache_s``."""

    def __init__(self, settings: CommonSettings, status_cache_s: float, idle_s: float = 30.0) -> None:
        self._settings = settings
        self._status_cache_s = status_cache_s
        self._idle_s = idle_s
        self._streams: dict[PipelineTopics, PipelineStream] = {}
        self._statuses: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise JoeyError("FAILED_PRECONDITION", "this client is closed: make a new joey.Client to infer")

    def stream(self, topics: PipelineTopics) -> PipelineStream:
        with self._lock:
            self._refuse_if_closed()
            stream = self._streams.get(topics)
            if stream is not None and stream.alive:
                return stream
        # Made (and a stopped one closed) outside the lock: a slow pipeline stalls no other's calls.
        if stream is not None:
            log.warning("the stream of %s stopped: starting a new one", topics.inputs)
        made = PipelineStream(self._settings, topics)
        with self._lock:
            current = self._streams.get(topics)
            if self._closed or (current is not None and current is not stream and current.alive):
                spare = made  # closed meanwhile, or another thread made one first
            else:
                spare, self._streams[topics] = None, made
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="idle-streams", daemon=True)
                    self._reaper.start()
        for old in (stream, spare):
            if old is not None:
                old.close()
        with self._lock:
            self._refuse_if_closed()
            return self._streams[topics]

    def infer_chunks(
        self,
        topics: PipelineTopics,
        chunks: Iterable[Sequence[dict[str, Any] | bytes]],
        total: int,
        timeout: float,
        progress: Progress | None,
    ) -> list[Reply]:
        """:meth:`PipelineStream.infer_chunks` on the pipeline's stream, a new one if it was just retired."""
        while True:
            try:
                return self.stream(topics).infer_chunks(chunks, total, timeout, progress)
            except _Retired:
                continue

    def _reap(self) -> None:
        # Closes streams nobody used for idle_s: their readers let go of the pipelines' topics.
        while not self._stop.wait(min(max(self._idle_s / 4, 0.05), 5.0)):
            with self._lock:
                idle = [t for t, s in self._streams.items() if s.retire_if_idle(self._idle_s)]
                retired = [self._streams.pop(t) for t in idle]
            for stream in retired:
                stream.close()

    def status(self, key: tuple[str, str], fetch: Callable[[], T], keep: Callable[[T], bool]) -> T:
        """The status of pipeline ``key`` (workspace, name) fetched at most ``status_cache_s`` ago; a
        fresh one is kept only when ``keep`` says so."""
        with self._lock:
            cached = self._statuses.get(key)
        if cached is not None and time.monotonic() < cached[0]:
            value: T = cached[1]
            return value
        value = fetch()
        if keep(value):
            with self._lock:
                self._statuses[key] = (time.monotonic() + self._status_cache_s, value)
        return value

    def forget_status(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._statuses.pop(key, None)

    def before_call(self, name: str, request: Any) -> None:
        """A pipeline (or workspace) about to be deleted loses its streams first: a reader assigned to
        topics being deleted can crash the process (librdkafka; see docs/reliability.md)."""
        if name == "DeletePipeline":
            key = (request.workspace, request.name)
            self._drop(lambda k: k == key, lambda t: t == pipeline_topics(*key))
        elif name == "DeleteWorkspace":
            prefix = pipeline_topics(request.name, "").inputs.removesuffix(".inputs")
            self._drop(lambda k: k[0] == request.name, lambda t: t.inputs.startswith(prefix))

    def _drop(
        self, status: Callable[[tuple[str, str]], bool], stream: Callable[[PipelineTopics], bool]
    ) -> None:
        with self._lock:
            for key in [k for k in self._statuses if status(k)]:
                del self._statuses[key]
            gone = [t for t in self._streams if stream(t)]
            dropped = [self._streams.pop(t) for t in gone]
        for dropped_stream in dropped:
            dropped_stream.close("the pipeline is being deleted")

    def after_call(self, name: str, request: Any) -> None:
        """What a registry call ``name`` changes here: a pipeline deployed, undeployed or rolled back is
        asked for its status again (as is a deleted one, should a call re-create it)."""
        if name in ("Deploy", "Undeploy", "Rollback"):
            self.forget_status((request.workspace, request.pipeline))
        elif name in ("DeletePipeline", "DeleteWorkspace"):
            self.before_call(name, request)

    def close(self) -> None:
        """Close every stream; a second close does nothing. Calls after it raise JoeyError."""
        with self._lock:
            self._closed = True
            streams = list(self._streams.values())
            self._streams.clear()
            reaper = self._reaper
        self._stop.set()
        for stream in streams:
            stream.close()
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(5)


def streams_of(client: RegistryCaller) -> Streams:
    streams = getattr(client, "streams", None)
    if not isinstance(streams, Streams):
        raise TypeError(f"a {type(client).__name__} cannot send records: infer with a joey.Client")
    return streams


def not_sent(request_id: str, reason: str) -> Reply:
    """The failed reply of a row that never reached the pipeline's inputs topic."""
    return failed_reply(request_id, f"not sent to the pipeline: {reason}", datetime.now(UTC).isoformat())
