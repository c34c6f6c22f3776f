"""The Open Inference Protocol REST transport (``/v2/...``), with Triton's binary tensor extension
(``Inference-Header-Content-Length``) that tritonclient uses by default. The logic is in :class:`Gateway`.

A threading HTTP/1.1 server with keep-alive: each request waits for its replies in its own thread.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import joey_core
from joey_gateway.errors import GatewayError, Status
from joey_gateway.service import SERVER_NAME, Gateway
from joey_gateway.tensors import InferRequest, InferResponse, Tensor, from_raw, from_values, to_raw

log = logging.getLogger(__name__)

_MODEL = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$"
)
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_BODY_BYTES = 64 << 20


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


def _input(item: Any, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(item, dict) or not {"name", "shape", "datatype"} <= item.keys():
        raise _bad('each input needs "name", "shape" and "datatype"')
    name, shape, datatype = str(item["name"]), item["shape"], str(item["datatype"])
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise _bad(f"input {name!r}: binary_data_size {size!r} does not fit the binary body")
        return Tensor(
            name, datatype, from_raw(name, datatype, shape, binary[offset : offset + size])
        ), offset + size
    if "data" not in item:
        raise _bad(f'input {name!r} has no "data"')
    return Tensor(name, datatype, from_values(name, datatype, shape, item["data"])), offset


def decode_request(model: str, version: str, body: bytes, header_length: int | None) -> RestRequest:
    text, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise _bad('request body must be a JSON object with an "inputs" list')
    inputs = []
    offset = 0
    for item in document["inputs"]:
        tensor, offset = _input(item, binary, offset)
        inputs.append(tensor)
    parameters = document.get("parameters") or {}
    outputs = [o for o in document.get("outputs") or [] if isinstance(o, dict) and "name" in o]
    timeout = parameters.get("timeout")
    request = InferRequest(
        model=model,
        id=str(document.get("id", "")),
        inputs=inputs,
        outputs=[str(o["name"]) for o in outputs],
        # Triton's request parameter: a timeout in microseconds.
        timeout_s=float(timeout) / 1e6 if isinstance(timeout, int | float) and timeout > 0 else None,
    )
    binary_outputs = {
        str(o["name"]): bool(o["parameters"]["binary_data"])
        for o in outputs
        if "binary_data" in (o.get("parameters") or {})
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK (~40 ms) on a keep-alive connection.
    disable_nagle_algorithm = True
    # A client that stalls (slowloris, a half-done TLS handshake) gives its thread back after this long.
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self,
        status: int,
        body: bytes,
        header_length: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header(
            "Content-Type", "application/json" if header_length is None else "application/octet-stream"
        )
        self.send_header("Content-Length", str(len(body)))
        if header_length is not None:
            self.send_header(HEADER_LENGTH, str(header_length))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, document: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(document).encode(), headers=headers)

    def _error(self, exc: GatewayError) -> None:
        # RFC 6750: a 401 names the scheme the caller must use.
        unauthenticated = exc.status == Status.UNAUTHENTICATED
        headers = {"WWW-Authenticate": 'Bearer realm="joey"'} if unauthenticated else None
        self._json(exc.status.http, {"error": exc.message}, headers)

    def _authorization(self) -> str | None:
        return self.headers.get("Authorization")

    def _body(self) -> bytes:
        declared = self.headers.get("Content-Length")
        if declared is None or not declared.isdigit():
            # Without a length the body would be read to the end of the connection, without a bound.
            raise GatewayError(
                Status.INVALID_ARGUMENT, f"Content-Length must be a non-negative integer, got {declared!r}"
            )
        length = int(declared)
        if length > MAX_BODY_BYTES:
            raise GatewayError(Status.INVALID_ARGUMENT, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def do_GET(self) -> None:  # noqa: N802
        gateway = self.server.gateway
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/v2/health/live":
                # Liveness needs no token: orchestrators probe it.
                self._json(200, {"live": True})
            elif path == "/v2":
                gateway.authenticate(self._authorization())
                self._json(
                    200,
                    {
                        "name": SERVER_NAME,
                        "version": joey_core.__version__,
                        "extensions": ["binary_tensor_data"],
                    },
                )
            elif path == "/v2/health/ready":
                gateway.authenticate(self._authorization())
                self._json(200, {"ready": True})
            elif match := _MODEL.match(path):
                model, version = unquote(match["model"]), unquote(match["version"] or "")
                if match["action"] == "/ready":
                    ready = gateway.model_ready(model, version, self._authorization())
                    # The protocol answers readiness with the status code: 200 ready, 4xx not.
                    self._json(200 if ready else 400, {"name": model, "ready": ready})
                elif match["action"] is None:
                    info = gateway.model(model, version, self._authorization())
                    self._json(
                        200,
                        {
                            "name": model,
                            "versions": [str(info.version)],
                            "platform": "joey_pipeline",
                            "inputs": [
                                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                for t in info.inputs
                            ],
                            "outputs": [
                                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                                for t in info.outputs
                            ],
                        },
                    )
                else:
                    self._json(405, {"error": f"use POST for {path}"})
            else:
                self._json(404, {"error": f"no such endpoint: GET {path}"})
        except GatewayError as exc:
            self._error(exc)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            # Who is asking comes before reading what they send: a stranger's body is never read.
            self.server.gateway.admit(self._authorization())
            body = self._body()
            match = _MODEL.match(path)
            if match is None or match["action"] != "/infer":
                self._json(404, {"error": f"no such endpoint: POST {path}"})
                return
            model, version = unquote(match["model"]), unquote(match["version"] or "")
            rest: RestRequest | None = None

            def decode() -> InferRequest:
                nonlocal rest
                length = self.headers.get(HEADER_LENGTH)
                if length is not None and not length.isdigit():
                    raise _bad(f"{HEADER_LENGTH} must be an integer, got {length!r}")
                rest = decode_request(model, version, body, None if length is None else int(length))
                return rest.request

            response = self.server.gateway.infer(model, version, decode, self._authorization())
            assert rest is not None  # infer() decoded the request before answering it
            self._send(200, *encode_response(rest, response))
        except GatewayError as exc:
            self._error(exc)
        except Exception:
            log.exception("inference request failed")
            self._json(500, {"error": "internal error; see the gateway's log"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], gateway: Gateway) -> None:
        super().__init__(addr, _Handler)
        self.gateway = gateway

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that speaks plain HTTP to the TLS port, or does not trust its certificate, is its own
        # problem: one line, not socketserver's traceback on stderr.
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLError):
            log.info("TLS handshake with %s failed: %s", client_address[0], exc.reason or exc)
        else:
            super().handle_error(request, client_address)


def start_server(
    gateway: Gateway, addr: str, tls_context: ssl.SSLContext | None = None
) -> tuple[ThreadingHTTPServer, int]:
    """Serve on ``addr`` (host:port; port 0 picks one) in a background thread, over TLS with
    ``tls_context``; returns server and port."""
    host, _, port = addr.rpartition(":")
    server = _Server((host or "0.0.0.0", int(port)), gateway)  # noqa: S104 - an empty host means every interface
    if tls_context is not None:
        # Each connection's handshake happens in its own handler thread, on its first read: a client
        # that never completes it holds up no other.
        server.socket = tls_context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(target=server.serve_forever, name="oip-http", daemon=True).start()
    return server, int(server.server_address[1])
