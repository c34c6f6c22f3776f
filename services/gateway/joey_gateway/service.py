"""The gateway's logic, shared by its gRPC and REST transports.

An inference request becomes one input record per row of its batch dimension, produced to the
pipeline's inputs topic with a ``request-id`` and a ``deadline-ms`` header. The replies, read by
the pipeline's :class:`ReplyReader`, are stacked back into the response's output tensors in
request order.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import pyarrow as pa
from confluent_kafka import KafkaError, Producer

from joey_core import tls, topics
from joey_core.kafka import max_record_bytes, producer_config, record_size
from joey_core.records import DEADLINE_EXCEEDED, DEADLINE_HEADER, REQUEST_ID_HEADER, dumps
from joey_core.replies import Call, Reply, ReplyReader
from joey_core.results import Row, reply_rows
from joey_core.v1 import registry_pb2_grpc
from joey_gateway import metrics
from joey_gateway.catalog import Catalog, NotDeployed, PipelineInfo
from joey_gateway.errors import GatewayError, Status
from joey_gateway.frames import input_records
from joey_gateway.registry_auth import RegistryAuth, bearer_token
from joey_gateway.settings import GatewaySettings
from joey_gateway.tensors import (
    InferRequest,
    InferResponse,
    Limits,
    Tensor,
    check_inputs,
    from_rows,
    to_rows,
)

log = logging.getLogger(__name__)

SERVER_NAME = "joey"

# The registry's actions a gateway call needs in the model's workspace.
READ = "read"
INFER = "infer"


_Headers = list[tuple[str, str | bytes | None]]
T = TypeVar("T")


class _Access(NamedTuple):
    """A caller authorized for a pipeline, and the token that says so (the registry is asked with it)."""

    workspace: str
    pipeline: str
    token: str


def _named(what: str, workspace: str, pipeline: str) -> tuple[str, str]:
    """``workspace`` and ``pipeline``, each a valid name, else NOT_FOUND saying which is not, of ``what``."""
    try:
        topics.validate_name("workspace", workspace)
        topics.validate_name("pipeline", pipeline)
    except ValueError as exc:
        raise GatewayError(Status.NOT_FOUND, f"{what}: {exc}") from None
    return workspace, pipeline


@dataclass
class _Held:
    """A pipeline's reply reader, with the requests using it and since when none has."""

    reader: ReplyReader
    calls: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        # The gateway holds no credentials: every registry call carries its caller's token.
        self._registry = tls.channel(settings.registry_addr, settings)
        stub = registry_pb2_grpc.RegistryStub(self._registry)
        self._auth = RegistryAuth(stub, settings.auth_cache_s, settings.auth_outage_grace_s)
        self._catalog = Catalog(stub, settings.status_cache_s, settings.catalog_stale_s)
        self.limits = Limits(settings.max_rows, settings.max_elements)
        # Latency over throughput: a synchronous caller waits for every record it sends.
        config = producer_config(settings, **{"linger.ms": 0})
        self._max_record_bytes = max_record_bytes(settings)
        self._producer = Producer(config)
        # Each pipeline's requests in flight, bounded so that a slow pipeline cannot hold every thread.
        self._slots: dict[tuple[str, str], threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._readers: dict[str, _Held] = {}
        self._readers_lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="idle-readers", daemon=True)
        self._reaper.start()
        self._in_flight = 0
        self._idle = threading.Condition()
        self._poller = threading.Thread(target=self._poll_producer, name="producer-poll", daemon=True)
        self._poller.start()

    def resolve(self, model: str) -> tuple[str, str]:
        """Workspace and pipeline served under a model name: ``<pipeline>`` or ``<workspace>.<pipeline>``."""
        workspace, _, pipeline = model.rpartition(".")
        return _named(f"model {model!r}", workspace or self._settings.workspace, pipeline)

    def authenticate(self, authorization: str | None) -> None:
        """Server-level routes (metadata, readiness) need a valid token, whatever its workspaces.
        ``authorization`` is the caller's ``Authorization`` header (or metadata) value, if any."""
        self._auth.authenticate(bearer_token(authorization))

    def admit(self, authorization: str | None) -> None:
        """Before a request's body is read: a caller without a valid token is refused unread, and counted
        as a refused request (of no pipeline, as infer counts a refusal)."""
        try:
            self.authenticate(authorization)
        except GatewayError as exc:
            self.refused(exc)
            raise

    def admitted(self, authorization: str | None) -> bool:
        """Whether the caller is let in on the registry's recent answer alone, which needs no call: then a
        transport may skip handing :meth:`admit` to a worker thread (an event loop must not wait on the
        registry). False means: call :meth:`admit`."""
        try:
            return self._auth.known(bearer_token(authorization))
        except GatewayError:
            return False

    def refused(self, exc: GatewayError) -> None:
        """Count a request the transport refused before it named a pipeline (its body unusable)."""
        metrics.REQUESTS.labels("", "", exc.status.name.lower()).inc()

    def model(self, model: str, version: str, authorization: str | None) -> PipelineInfo:
        """The deployed pipeline served as ``model`` (and ``version``, when given), for a caller who may
        read its workspace."""
        return self._deployed(
            model, version, self._authorized(lambda: self.resolve(model), authorization, READ)
        )

    def model_ready(self, model: str, version: str, authorization: str | None) -> bool:
        # Refusals stand (a caller who may not read the model learns nothing of it); only an
        # unavailable deployment reads as not ready.
        access = self._authorized(lambda: self.resolve(model), authorization, READ)
        try:
            return self._deployed(model, version, access).ready
        except GatewayError as exc:
            if exc.status == Status.UNAVAILABLE:
                return False
            raise

    def _authorized(
        self, names: Callable[[], tuple[str, str]], authorization: str | None, action: str
    ) -> _Access:
        """The caller's access to the workspace and pipeline ``names`` gives (NOT_FOUND for invalid names)."""
        token = bearer_token(authorization)
        try:
            workspace, pipeline = names()
        except GatewayError:
            self._auth.authenticate(token)  # a bad token is refused as such, whatever the model name
            raise
        self._auth.authorize(token, workspace, action)
        return _Access(workspace, pipeline, token)

    def _deployed(self, model: str, version: str, access: _Access) -> PipelineInfo:
        info = self._catalog.pipeline(access.workspace, access.pipeline, access.token)
        if version and version != str(info.version):
            raise GatewayError(
                Status.NOT_FOUND,
                f"model {model!r} version {version!r} is not deployed; "
                f"the deployed version is {info.version}",
            )
        return info

    def infer(
        self,
        model: str,
        version: str,
        decode: Callable[[], InferRequest],
        authorization: str | None,
        deadline: float | None = None,
    ) -> InferResponse:
        """Run the request for ``model`` (``decode`` builds it from the transport's message, so a malformed
        one counts as a refused request of that model) through its pipeline, for a caller who may infer in
        its workspace. ``deadline`` (epoch seconds) is the transport's own, if any; the earliest of it, the
        request's timeout and the gateway's default applies."""

        def run(info: PipelineInfo) -> InferResponse:
            request = decode()
            # Refused whole before any work on its rows.
            check_inputs(info.pipeline, request.inputs, {t.name: t.shape for t in info.inputs})
            rows = to_rows(request.inputs)
            replies = self._exchange(info, rows, self._deadline(deadline, request.timeout_s))
            return self._response(request, info, replies)

        return self._served(lambda: self.resolve(model), model, version, authorization, run)

    def infer_records(
        self,
        workspace: str,
        pipeline: str,
        decode: Callable[[], pa.Table | list[dict[str, Any]]],
        authorization: str | None,
        timeout_s: float | None = None,
    ) -> list[Row]:
        """The records endpoint: run the records (or Arrow table) ``decode`` reads from the body through the
        pipeline, shaped for its inputs as the SDK shapes them (:func:`frames.input_records`),
        answered with the SDK's ``pipeline.infer`` result rows (:func:`joey_core.results.reply_rows`),
        a record the pipeline refused being a row with its ``error``. Authorized, limited and counted as
        :meth:`infer` is."""

        def run(info: PipelineInfo) -> list[Row]:
            rows = input_records(info.pipeline, decode(), info.record_inputs)
            return reply_rows(self._exchange(info, rows, self._deadline(None, timeout_s)))

        where = f"pipeline {pipeline!r} of workspace {workspace!r}"
        return self._served(
            lambda: _named(where, workspace, pipeline), where, "", authorization, run, Status.NOT_FOUND
        )

    def _served(
        self,
        names: Callable[[], tuple[str, str]],
        model: str,
        version: str,
        authorization: str | None,
        run: Callable[[PipelineInfo], T],
        not_deployed: Status = Status.UNAVAILABLE,
    ) -> T:
        """``run`` on the deployed pipeline ``names`` gives (the workspace and pipeline served as ``model``,
        the name errors speak of), for a caller who may infer in its workspace,
        holding one of the pipeline's request slots; counted and timed in the metrics. A pipeline that is
        not deployed is refused with ``not_deployed``."""
        with self._idle:
            self._in_flight += 1
        start = time.perf_counter()
        labels = ("", "")
        outcome = "ok"
        try:
            access = self._authorized(names, authorization, INFER)
            try:
                info = self._deployed(model, version, access)
            except NotDeployed as exc:
                raise GatewayError(not_deployed, exc.message) from None
            labels = (info.workspace, info.pipeline)
            slot = self._slot(info)
            try:  # from the moment it is taken: nothing after may keep the slot
                in_flight = metrics.IN_FLIGHT.labels(*labels)
                in_flight.inc()
                try:
                    return run(info)
                finally:
                    in_flight.dec()
            finally:
                slot.release()
        except GatewayError as exc:
            outcome = exc.status.name.lower()
            raise
        except Exception:
            outcome = "internal"
            raise
        finally:
            metrics.REQUESTS.labels(*labels, outcome).inc()
            if labels[1]:
                metrics.REQUEST_SECONDS.labels(*labels).observe(time.perf_counter() - start)
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _slot(self, info: PipelineInfo) -> threading.BoundedSemaphore:
        """One of the pipeline's request slots, taken (release it), or RESOURCE_EXHAUSTED when all are."""
        key = (info.workspace, info.pipeline)
        with self._slots_lock:
            slots = self._slots.get(key)
            if slots is None:
                slots = self._slots[key] = threading.BoundedSemaphore(self._settings.pipeline_concurrency)
        if not slots.acquire(blocking=False):
            raise GatewayError(
                Status.RESOURCE_EXHAUSTED,
                f"pipeline {info.pipeline!r} already has {self._settings.pipeline_concurrency} requests in "
                "flight at this gateway; retry later",
            )
        return slots

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight (True), or ``timeout`` passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _deadline(self, transport: float | None, timeout_s: float | None) -> float:
        """The request's deadline (epoch seconds): the earliest of the gateway's default, the transport's
        own and the request's timeout."""
        now = time.time()
        limits = [now + self._settings.request_timeout_s]
        if transport is not None:
            limits.append(transport)
        if timeout_s is not None:
            limits.append(now + timeout_s)
        return min(limits)

    def _exchange(self, info: PipelineInfo, rows: list[dict[str, Any]], deadline: float) -> list[Reply]:
        """Produce one input record per row and wait for every reply, returned in row order."""
        call = Call([uuid.uuid4().hex for _ in rows])
        deadline_header = str(int(deadline * 1000)).encode()
        headers: list[_Headers] = [
            [(REQUEST_ID_HEADER, request_id.encode()), (DEADLINE_HEADER, deadline_header)]
            for request_id in call.request_ids
        ]
        values = self._records(rows, call.request_ids, headers)
        names = topics.pipeline_topics(info.workspace, info.pipeline)
        with self._reading(names) as reader:
            reader.expect(call)
            try:

                def delivered(err: KafkaError | None, msg: Any) -> None:
                    if err is not None:
                        call.fail(f"request not accepted by Kafka: {err}")

                for sent, (request_id, value, record_headers) in enumerate(
                    zip(call.request_ids, values, headers, strict=True)
                ):
                    self._produce(
                        names.inputs,
                        value,
                        request_id.encode(),
                        record_headers,
                        delivered,
                        # Nothing sent yet: refused whole at once. Part sent: the rest follows when there
                        # is room.
                        None if sent == 0 else deadline,
                    )
                if not call.done.wait(max(0.0, deadline - time.time())):
                    raise GatewayError(
                        Status.DEADLINE_EXCEEDED,
                        f"{DEADLINE_EXCEEDED}: {len(call.replies)} of {len(rows)} records answered in time "
                        f"by pipeline {info.pipeline!r} (status {info.status})",
                    )
            finally:
                reader.forget(call)
            if call.failure is not None:
                raise GatewayError(Status.UNAVAILABLE, call.failure)
            return [call.replies[request_id] for request_id in call.request_ids]

    def _records(
        self, rows: list[dict[str, Any]], request_ids: list[str], headers: list[_Headers]
    ) -> list[bytes]:
        """Every row's record value, each checked against the broker's message limit before any is produced:
        a request is refused whole, naming its first row that would not fit, or produced whole."""
        values = []
        # Each row checked as it is encoded: a too large one stops the encoding of the rest.
        for index, (row, request_id, record_headers) in enumerate(
            zip(rows, request_ids, headers, strict=True)
        ):
            try:
                value = dumps(row)
            except (TypeError, ValueError) as exc:  # an Arrow body's dates or binary values, say
                raise GatewayError(
                    Status.INVALID_ARGUMENT, f"a record is not JSON-serializable: {exc}"
                ) from None
            size = record_size(request_id.encode(), value, record_headers)
            if size > self._max_record_bytes:
                raise GatewayError(
                    Status.TOO_LARGE,
                    f"row {index} of the batch makes a record of {size} bytes with its key and headers; a "
                    f"record holds at most {self._max_record_bytes} (the producer's message.max.bytes less "
                    "Kafka's overhead): nothing was sent",
                )
            values.append(value)
        return values

    def _produce(
        self,
        topic: str,
        value: bytes,
        key: bytes,
        headers: _Headers,
        delivered: Callable[[KafkaError | None, Any], None],
        deadline: float | None,
    ) -> None:
        """Produce one record. With the producer's queue full: UNAVAILABLE at once when ``deadline`` is None,
        else retried as deliveries make room, until the deadline (DEADLINE_EXCEEDED)."""
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=delivered)
                return
            except BufferError:
                if deadline is None:
                    raise GatewayError(
                        Status.UNAVAILABLE, "too many requests in flight: Kafka's queue is full"
                    ) from None
                if time.time() >= deadline:
                    raise GatewayError(
                        Status.DEADLINE_EXCEEDED,
                        f"{DEADLINE_EXCEEDED}: Kafka's queue stayed full; part of the batch was sent",
                    ) from None
                self._producer.poll(0.05)  # serves delivery reports, which frees queue room

    def _response(self, request: InferRequest, info: PipelineInfo, replies: list[Reply]) -> InferResponse:
        for index, reply in enumerate(replies):
            if not reply.ok:
                reason = str(reply.body.get("error", "unknown error"))
                status = (
                    Status.DEADLINE_EXCEEDED
                    if reason.startswith(DEADLINE_EXCEEDED)
                    else Status.INVALID_ARGUMENT
                )
                where = f" (row {index} of the batch)" if len(replies) > 1 else ""
                raise GatewayError(status, f"pipeline {info.pipeline!r}{where}: {reason}")
        outs = [reply.body.get("out", {}) for reply in replies]
        produced = list(outs[0])
        declared = [t.name for t in info.outputs if t.name in produced]
        names = declared + [name for name in produced if name not in declared]
        if request.outputs:
            unknown = [name for name in request.outputs if name not in produced]
            if unknown:
                raise GatewayError(
                    Status.INVALID_ARGUMENT, f"unknown outputs {unknown}; pipeline outputs are {names}"
                )
            names = list(request.outputs)
        tensors: list[Tensor] = []
        for name in names:
            tensors.append(from_rows(name, info.output_datatype(name), [out.get(name) for out in outs]))
        return InferResponse(request.model, str(info.version), request.id, tensors)

    @contextmanager
    def _reading(self, names: topics.PipelineTopics) -> Iterator[ReplyReader]:
        """The pipeline's reader, made on first use (or when the last one stopped), kept while in use."""
        stopped = None
        with self._readers_lock:
            held = self._readers.get(names.outputs)
            if held is None or not held.reader.alive:
                stopped = held
                try:
                    held = _Held(ReplyReader(self._settings, names))
                except LookupError as exc:
                    raise GatewayError(Status.UNAVAILABLE, str(exc)) from None
                self._readers[names.outputs] = held
                metrics.REPLY_READERS.set(len(self._readers))
            held.calls += 1
        if stopped is not None:
            stopped.reader.close()
        try:
            yield held.reader
        finally:
            with self._readers_lock:
                held.calls -= 1
                held.idle_since = time.monotonic()

    def _reap(self) -> None:
        # An idle reader holds its pipeline's topics, which a reader must not hold while they are deleted
        # (docs/reliability.md); the next request of the pipeline opens a new one.
        idle_s = self._settings.stream_idle_s
        while not self._stop.wait(min(max(idle_s / 4, 0.05), 5.0)):
            now = time.monotonic()
            with self._readers_lock:
                idle = [k for k, h in self._readers.items() if not h.calls and now - h.idle_since >= idle_s]
                closing = [self._readers.pop(k) for k in idle]
                metrics.REPLY_READERS.set(len(self._readers))
            for held in closing:
                log.debug("closing the idle reader of %s", held.reader)
                held.reader.close()

    def _poll_producer(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(5)
        self._reaper.join(5)
        self._producer.flush(5)
        with self._readers_lock:
            for held in self._readers.values():
                held.reader.close()
            self._readers.clear()
            metrics.REPLY_READERS.set(0)
        self._registry.close()
