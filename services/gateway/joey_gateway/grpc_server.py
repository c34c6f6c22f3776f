"""The Open Inference Protocol gRPC transport: proto messages in and out, the logic in :class:`Gateway`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc

import joey_core
from joey_core import tls
from joey_core.oip import grpc_predict_v2_pb2 as pb
from joey_core.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from joey_gateway.errors import GatewayError, Status
from joey_gateway.service import SERVER_NAME, Gateway
from joey_gateway.settings import CONTROL_WORKERS, GatewaySettings
from joey_gateway.tensors import InferRequest, Limits, Tensor, from_raw, from_values, to_raw

_CODES = {
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    # Not RESOURCE_EXHAUSTED: a client retrying what the limits refuse would be refused again. (A message
    # over max_request_bytes is refused by grpc itself, before the gateway sees it, as RESOURCE_EXHAUSTED.)
    Status.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    Status.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Which InferTensorContents field holds each datatype.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

T = TypeVar("T")

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, exc: GatewayError) -> NoReturn:
    context.abort(_CODES[exc.status], exc.message)
    raise AssertionError("unreachable")  # abort raises


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except GatewayError as exc:
        _abort(context, exc)
    except Exception:
        # Not grpc's own "Exception calling application: <the exception>": the detail may name anything.
        log.exception("inference request failed")
        _abort(context, GatewayError(Status.INTERNAL, "internal error; see the gateway's log"))


def _authorization(context: grpc.ServicerContext) -> str | None:
    """The caller's ``authorization`` metadata (``Bearer <token>``), if any."""
    return next((str(v) for k, v in context.invocation_metadata() if k == "authorization"), None)


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _timeout_s(parameters: Any) -> float | None:
    # Triton's request parameter: a timeout in microseconds.
    if "timeout" in parameters:
        value = parameter_value(parameters["timeout"])
        if isinstance(value, int | float) and value > 0:
            return float(value) / 1e6
    return None


def decode_request(request: pb.ModelInferRequest, limits: Limits) -> InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise GatewayError(
            Status.INVALID_ARGUMENT,
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input or none",
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            data = from_raw(tensor.name, tensor.datatype, shape, raw[index], limits)
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise GatewayError(
                    Status.INVALID_ARGUMENT,
                    f"input {tensor.name!r}: {tensor.datatype} data must be sent in raw_input_contents",
                )
            values = list(getattr(tensor.contents, field))
            data = from_values(tensor.name, tensor.datatype, shape, values, limits)
        inputs.append(Tensor(tensor.name, tensor.datatype, data))
    return InferRequest(
        model=request.model_name,
        id=request.id,
        inputs=inputs,
        outputs=[output.name for output in request.outputs],
        timeout_s=_timeout_s(request.parameters),
    )


class _Pool:
    """A share of the server's threads: a call beyond it is RESOURCE_EXHAUSTED at once, so that inference
    calls waiting on slow pipelines never take the threads readiness and metadata are answered on."""

    def __init__(self, size: int, what: str) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._refusal = GatewayError(
            Status.RESOURCE_EXHAUSTED, f"all {size} of the gateway's {what} workers are busy; retry later"
        )

    def call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        if not self._slots.acquire(blocking=False):
            _abort(context, self._refusal)
        try:
            return _call(context, fn)
        finally:
            self._slots.release()


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway, inference_workers: int) -> None:
        self._gateway = gateway
        self._inference = _Pool(inference_workers, "inference")
        self._control = _Pool(CONTROL_WORKERS, "health and metadata")

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> pb.ServerLiveResponse:  # noqa: N802
        # Liveness needs no token: orchestrators probe it.
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> pb.ServerReadyResponse:  # noqa: N802
        self._control.call(context, lambda: self._gateway.authenticate(_authorization(context)))
        return pb.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:  # noqa: N802
        self._control.call(context, lambda: self._gateway.authenticate(_authorization(context)))
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=joey_core.__version__)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> pb.ModelReadyResponse:  # noqa: N802
        ready = self._control.call(
            context,
            lambda: self._gateway.model_ready(request.name, request.version, _authorization(context)),
        )
        return pb.ModelReadyResponse(ready=ready)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:  # noqa: N802
        info = self._control.call(
            context, lambda: self._gateway.model(request.name, request.version, _authorization(context))
        )

        def tensors(specs: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in specs
            ]

        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(info.version)],
            platform="joey_pipeline",
            inputs=tensors(info.inputs),
            outputs=tensors(info.outputs),
        )

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> pb.ModelInferResponse:  # noqa: N802
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        result = self._inference.call(
            context,
            lambda: self._gateway.infer(
                request.model_name,
                request.model_version,
                lambda: decode_request(request, self._gateway.limits),
                _authorization(context),
                deadline,
            ),
        )
        return pb.ModelInferResponse(
            model_name=result.model,
            model_version=result.version,
            id=result.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in result.outputs
            ],
            raw_output_contents=[to_raw(t) for t in result.outputs],
        )


def start_server(gateway: Gateway, settings: GatewaySettings) -> tuple[grpc.Server, int]:
    """Serve on ``settings.oip_grpc_addr`` (over TLS when the settings name a certificate); returns the
    server and the bound port (the address may ask for port 0)."""
    workers = settings.grpc_workers + CONTROL_WORKERS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip-grpc"),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", 64 << 20),
        ],
        # A call beyond the threads is refused (RESOURCE_EXHAUSTED), not queued without bound; the
        # servicer divides them between inference and the rest, each pipeline's share bounded by the gateway.
        maximum_concurrent_rpcs=workers,
    )
    servicer = OipServicer(gateway, settings.grpc_workers)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = tls.add_port(server, settings.oip_grpc_addr, settings)
    if port == 0:
        raise OSError(f"cannot listen on {settings.oip_grpc_addr} for the OIP gRPC service")
    server.start()
    return server, port
