"""The Open Inference Protocol REST transport (``/v2/...``), with Triton's binary tensor extension
(``Inference-Header-Content-Length``) that tritonclient uses by default. The logic is in :class:`Gateway`.

Starlette routes served by uvicorn (h11) on an event loop of its own thread: the connections cost no thread
each, so a client that stalls holds a socket, not a worker. The limits, each answered without waiting on the
client: open connections and requests (``http_max_connections``, 503), headers within ``header_timeout_s`` of
the connection's opening or last answer (the connection is closed), no Transfer-Encoding (400), a body no
longer than ``max_request_bytes`` by its Content-Length (413, unread) and by the bytes that arrive (413, read
no further), whole within ``body_timeout_s`` (400). The gateway's inference calls run on ``http_workers``
threads, each pipeline's share of them bounded by the gateway itself (429); health, metadata and token
checks on a few threads of their own; a request finding no free worker within ``worker_wait_s`` is 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

import joey_core
from joey_gateway import frames, openapi
from joey_gateway.errors import GatewayError, Status
from joey_gateway.service import SERVER_NAME, Gateway
from joey_gateway.settings import CONTROL_WORKERS, GatewaySettings
from joey_gateway.tensors import InferRequest, InferResponse, Limits, Tensor, from_raw, from_values, to_raw

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
RETRY_AFTER_S = 1
"""What a 429 (a pipeline's requests all in flight) asks the caller to wait: its requests take ms."""

T = TypeVar("T")


def _bad(message: str) -> GatewayError:
    return GatewayError(Status.INVALID_ARGUMENT, message)


@dataclass
class RestRequest:
    request: InferRequest
    binary_default: bool = False
    """Whether outputs come back as binary unless an output says otherwise."""
    binary: dict[str, bool] = field(default_factory=dict)
    """Per requested output: binary or JSON data."""

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def _input(item: Any, binary: bytes, offset: int, limits: Limits) -> tuple[Tensor, int]:
    if not isinstance(item, dict) or not {"name", "shape", "datatype"} <= item.keys():
        raise _bad('each input needs "name", "shape" and "datatype"')
    name, shape, datatype = str(item["name"]), item["shape"], str(item["datatype"])
    if not isinstance(shape, list):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad(f'input {name!r}: "parameters" must be a JSON object')
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise _bad(f"input {name!r}: binary_data_size {size!r} does not fit the binary body")
        return Tensor(
            name, datatype, from_raw(name, datatype, shape, binary[offset : offset + size], limits)
        ), offset + size
    if "data" not in item:
        raise _bad(f'input {name!r} has no "data"')
    return Tensor(name, datatype, from_values(name, datatype, shape, item["data"], limits)), offset


def decode_request(
    model: str, version: str, body: bytes, header_length: int | None, limits: Limits
) -> RestRequest:
    if header_length is not None and header_length > len(body):
        raise _bad(f"{HEADER_LENGTH} {header_length} is longer than the {len(body)}-byte body")
    text, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    document = frames.json_document(text)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise _bad('request body must be a JSON object with an "inputs" list')
    inputs = []
    offset = 0
    for item in document["inputs"]:
        tensor, offset = _input(item, binary, offset, limits)
        inputs.append(tensor)
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad('"parameters" must be a JSON object')
    requested = document.get("outputs") or []
    if not isinstance(requested, list):
        raise _bad('"outputs" must be a list')
    outputs = [o for o in requested if isinstance(o, dict) and "name" in o]
    timeout = parameters.get("timeout")
    # Triton's request parameter: a timeout in microseconds. A JSON integer has no bound; past a float's, it
    # is longer than the gateway's own deadline anyway.
    timeout_s = float(min(timeout, 1e300)) / 1e6 if isinstance(timeout, int | float) and timeout > 0 else None
    request = InferRequest(
        model=model,
        id=str(document.get("id", "")),
        inputs=inputs,
        outputs=[str(o["name"]) for o in outputs],
        timeout_s=timeout_s,
    )
    binary_outputs = {
        str(o["name"]): bool(o["parameters"]["binary_data"])
        for o in outputs
        if isinstance(o.get("parameters"), dict) and "binary_data" in o["parameters"]
    }
    return RestRequest(request, bool(parameters.get("binary_data_output", False)), binary_outputs)


def encode_response(rest: RestRequest, response: InferResponse) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    outputs = []
    blobs = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if rest.wants_binary(tensor.name):
            blob = to_raw(tensor)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            values = tensor.data.reshape(-1).tolist()
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model,
        "model_version": response.version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def _error(exc: GatewayError, close: bool = False) -> JSONResponse:
    headers = {}
    if exc.status == Status.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="joey"'  # RFC 6750: a 401 names the scheme to use
    elif exc.status == Status.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if close:
        # The body was not read to its end: the connection cannot carry another request.
        headers["Connection"] = "close"
    return JSONResponse({"error": exc.message}, exc.status.http, headers)


def _tensors(specs: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]


@dataclass(frozen=True)
class _Pools:
    inference: anyio.CapacityLimiter
    control: anyio.CapacityLimiter
    threads: anyio.CapacityLimiter


class RestApi:
    """The routes, each a thin adapter: read the request, call the gateway on a worker thread, answer."""

    def __init__(self, gateway: Gateway, settings: GatewaySettings) -> None:
        self._gateway = gateway
        self._settings = settings
        self._pools_: _Pools | None = None
        self.app = Starlette(
            routes=[
                Route("/v2/health/live", self._live),
                Route("/v2/health/ready", self._ready),
                Route("/v2", self._server_metadata),
                Route("/v2/openapi.json", self._openapi),
                Route("/v2/models/{model}", self._model_metadata),
                Route("/v2/models/{model}/versions/{version}", self._model_metadata),
                Route("/v2/models/{model}/ready", self._model_ready),
                Route("/v2/models/{model}/versions/{version}/ready", self._model_ready),
                Route("/v2/models/{model}/infer", self._infer, methods=["POST"]),
                Route("/v2/models/{model}/versions/{version}/infer", self._infer, methods=["POST"]),
                Route("/pipelines/{workspace}/{pipeline}/infer", self._infer_records, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )
        # A trailing slash is the same route, not a redirect (as the stdlib server answered).
        self.app.router.redirect_slashes = False

    def _pools(self) -> _Pools:
        if self._pools_ is None:  # made on the server's own event loop
            self._pools_ = _Pools(
                anyio.CapacityLimiter(self._settings.http_workers),
                anyio.CapacityLimiter(CONTROL_WORKERS),
                anyio.CapacityLimiter(self._settings.http_workers + CONTROL_WORKERS),
            )
        return self._pools_

    async def _run(self, fn: Callable[[], T], inference: bool = False) -> T:
        """``fn`` on a worker thread of the inference pool or of the small one that health, metadata and
        token checks have to themselves; UNAVAILABLE when none frees within ``worker_wait_s``."""
        pools = self._pools()
        pool = pools.inference if inference else pools.control
        try:
            with anyio.fail_after(self._settings.worker_wait_s):
                await pool.acquire()
        except TimeoutError:
            raise GatewayError(
                Status.UNAVAILABLE,
                f"every gateway worker stayed busy for {self._settings.worker_wait_s:g} s; retry later",
            ) from None
        try:
            # Not bounded by anyio's default 40 threads: the pools above are the bound.
            return await anyio.to_thread.run_sync(fn, limiter=pools.threads)
        finally:
            pool.release()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            message = f"{request.method} is not served on {request.url.path}"
        else:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, exc.status_code, exc.headers)

    async def _live(self, request: Request) -> Response:
        # Liveness needs no token: orchestrators probe it.
        return JSONResponse({"live": True})

    async def _openapi(self, request: Request) -> Response:
        # Open like liveness: the document describes the protocol, nothing of any deployment.
        return JSONResponse(openapi.DOCUMENT)

    async def _ready(self, request: Request) -> Response:
        try:
            await self._run(lambda: self._gateway.authenticate(request.headers.get("Authorization")))
        except GatewayError as exc:
            return _error(exc)
        return JSONResponse({"ready": True})

    async def _server_metadata(self, request: Request) -> Response:
        try:
            await self._run(lambda: self._gateway.authenticate(request.headers.get("Authorization")))
        except GatewayError as exc:
            return _error(exc)
        return JSONResponse(
            {"name": SERVER_NAME, "version": joey_core.__version__, "extensions": ["binary_tensor_data"]}
        )

    async def _model_ready(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        authorization = request.headers.get("Authorization")
        try:
            ready = await self._run(lambda: self._gateway.model_ready(model, version, authorization))
        except GatewayError as exc:
            return _error(exc)
        # The protocol answers readiness with the status code: 200 ready, 4xx not.
        return JSONResponse({"name": model, "ready": ready}, 200 if ready else 400)

    async def _model_metadata(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        authorization = request.headers.get("Authorization")
        try:
            info = await self._run(lambda: self._gateway.model(model, version, authorization))
        except GatewayError as exc:
            return _error(exc)
        return JSONResponse(
            {
                "name": model,
                "versions": [str(info.version)],
                "platform": "joey_pipeline",
                "inputs": _tensors(info.inputs),
                "outputs": _tensors(info.outputs),
            }
        )

    async def _body(self, request: Request) -> bytes:
        if "Transfer-Encoding" in request.headers:
            # h11 lets Transfer-Encoding win over a Content-Length sent beside it: the declared length
            # would bound nothing. A chunked body's size is unknown until read, so none is taken.
            raise _bad("Transfer-Encoding is not accepted: send the body with a Content-Length")
        declared = request.headers.get("Content-Length")
        if declared is None or not declared.isdigit():
            raise _bad(f"Content-Length must be a non-negative integer, got {declared!r}")
        length, limit = int(declared), self._settings.max_request_bytes
        if length > limit:
            raise GatewayError(
                Status.TOO_LARGE, f"request body of {length} bytes; the gateway takes at most {limit}"
            )
        chunks: list[bytes] = []
        received = 0
        try:
            with anyio.fail_after(self._settings.body_timeout_s):
                async for chunk in request.stream():
                    received += len(chunk)
                    # Counted as it arrives, not trusted from the header: should the parser ever frame a
                    # body by anything but the Content-Length checked above, reading still stops here.
                    if received > limit:
                        raise GatewayError(
                            Status.TOO_LARGE,
                            f"request body over {limit} bytes, the most the gateway takes; not read further",
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise _bad(
                f"{received} of the body's {length} bytes (its Content-Length) arrived in "
                f"{self._settings.body_timeout_s:g} s"
            ) from None
        except ClientDisconnect:
            raise _bad(f"the client left after {received} of the body's {length} bytes") from None
        return b"".join(chunks)

    async def _admit(self, authorization: str | None) -> Response | None:
        """Who is asking comes before reading what they send: a stranger's body is never read. The refusal
        to answer, or None. A caller the registry said yes to within the auth cache is let in on the event
        loop, sparing the request a hand-off to a worker thread and back; others are checked on one."""
        if self._gateway.admitted(authorization):
            return None
        try:
            await self._run(lambda: self._gateway.admit(authorization))
        except GatewayError as exc:
            return _error(exc, close=True)
        return None

    async def _infer(self, request: Request) -> Response:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        authorization = request.headers.get("Authorization")
        refused = await self._admit(authorization)
        if refused is not None:
            return refused
        try:
            body = await self._body(request)
        except GatewayError as exc:
            self._gateway.refused(exc)
            return _error(exc, close=True)
        length = request.headers.get(HEADER_LENGTH)
        rest: RestRequest | None = None

        def decode() -> InferRequest:
            nonlocal rest
            if length is not None and not length.isdigit():
                raise _bad(f"{HEADER_LENGTH} must be an integer, got {length!r}")
            header = None if length is None else int(length)
            rest = decode_request(model, version, body, header, self._gateway.limits)
            return rest.request

        def serve() -> tuple[bytes, int | None]:
            response = self._gateway.infer(model, version, decode, authorization)
            assert rest is not None  # infer() decoded the request before answering it
            # Off the event loop: up to max_rows x max_elements values to list, dump and join.
            return encode_response(rest, response)

        try:
            content, header_length = await self._run(serve, inference=True)
        except GatewayError as exc:
            return _error(exc)
        except Exception:
            log.exception("inference request failed")
            return JSONResponse({"error": "internal error; see the gateway's log"}, 500)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
        )

    async def _infer_records(self, request: Request) -> Response:
        """Wallaroo's endpoint: records in (pandas records JSON or Arrow IPC), result rows out, alike."""
        workspace, pipeline = request.path_params["workspace"], request.path_params["pipeline"]
        authorization = request.headers.get("Authorization")
        refused = await self._admit(authorization)
        if refused is not None:
            return refused
        try:
            format = frames.body_format(request.headers.get("Content-Type"))
            timeout_s = _timeout(request.query_params.get("timeout"))
            body = await self._body(request)
        except GatewayError as exc:
            self._gateway.refused(exc)
            return _error(exc, close=True)

        def serve() -> bytes:
            result = self._gateway.infer_records(
                workspace,
                pipeline,
                lambda: frames.decode_records(
                    body, format, self._gateway.limits, self._settings.max_request_bytes
                ),
                authorization,
                timeout_s,
            )
            return frames.encode_rows(result, format)  # off the event loop, as the rows may be many

        try:
            content = await self._run(serve, inference=True)
        except GatewayError as exc:
            return _error(exc)
        except Exception:
            log.exception("inference request failed")
            return JSONResponse({"error": "internal error; see the gateway's log"}, 500)
        return Response(content, media_type=format.value)


def _timeout(value: str | None) -> float | None:
    """The ``timeout`` query parameter: the request's deadline, in seconds from now."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise _bad(f"timeout must be a positive number of seconds, got {value!r}")
    return seconds


def _protocol(header_timeout_s: float) -> type[H11Protocol]:
    class Protocol(H11Protocol):
        """uvicorn's h11 protocol, and a deadline on each request's headers: its keep-alive timeout restarts
        on every byte, so a client sending headers a byte at a time (slowloris) would hold the connection
        forever. A connection serving no request ``header_timeout_s`` after it opened or last answered is
        closed, however busy its client is."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # asyncio sets TCP_NODELAY only on sockets whose protocol number is IPPROTO_TCP, which a socket
            # accepted from socket.create_server's (protocol 0) is not; uvicorn writes an answer's headers
            # and body apart, so Nagle's algorithm would hold the body until the client's delayed ACK.
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            serving = self.cycle is not None and not self.cycle.response_complete
            if not serving and not self.transport.is_closing():
                log.info(
                    "closing a connection from %s: no request within %g s", self.client, header_timeout_s
                )
                self.transport.close()

    return Protocol


class HttpServer:
    """uvicorn on a thread of its own."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._server = server
        self._thread = threading.Thread(target=self._run, args=(sock,), name="oip-http", daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except SystemExit as exc:  # how uvicorn ends when it cannot start; it logged why
            log.error("the REST server stopped: uvicorn's exit status %s", exc.code)
        except Exception:
            log.exception("the REST server failed")

    def wait_started(self) -> None:
        """Until uvicorn accepts connections; RuntimeError if its thread ended first (uvicorn logged why)."""
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the REST server stopped before it started serving")
            self._thread.join(0.05)

    @property
    def alive(self) -> bool:
        """False once uvicorn's thread ended: the gateway no longer serves REST."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop accepting connections; the requests in flight finish (each ends by its deadline)."""
        self._server.should_exit = True

    def wait(self) -> None:
        """Until the requests in flight are answered and the server stopped."""
        self._thread.join()


def start_server(
    gateway: Gateway, settings: GatewaySettings, tls_context: ssl.SSLContext | None = None
) -> tuple[HttpServer, int]:
    """Serve on ``settings.oip_http_addr`` (host:port; port 0 picks one) in a background thread, over TLS
    with ``tls_context``; returns the server and its port."""
    host, _, port = settings.oip_http_addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an empty host means every interface
    # Bound here, not by uvicorn: the port is known (and refused, if taken) before the thread starts.
    sock = socket.create_server(
        (host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048
    )
    config = uvicorn.Config(
        RestApi(gateway, settings).app,
        http=_protocol(settings.header_timeout_s),
        lifespan="off",
        log_config=None,  # the service's logging, configured once
        access_log=False,
        limit_concurrency=settings.http_max_connections,
        timeout_keep_alive=int(max(1, settings.header_timeout_s)),
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 1,
        # joey_core.tls's context, the one the registry's clients are documented against.
        ssl_context_factory=None if tls_context is None else (lambda config, default: tls_context),
        server_header=False,
    )
    return HttpServer(uvicorn.Server(config), sock), int(sock.getsockname()[1])
