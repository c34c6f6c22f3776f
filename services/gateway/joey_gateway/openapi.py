"""The OpenAPI 3.0 document of the gateway's REST endpoints, served at ``GET /v2/openapi.json``.

Written by hand from the Open Inference Protocol's REST API (KServe V2) as the gateway serves it: the tests
drive the running server with schemathesis against it, so the document and the server cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from joey_gateway.tensors import DATATYPES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or _ERROR}}}


_REFUSALS = {
    "401": _answer("no, a malformed, unknown, expired or revoked token"),
    "403": _answer("the caller's role lacks the action"),
    "404": _answer("no such model, or a workspace the caller is not a member of"),
    "429": _answer("the pipeline's requests are all in flight at this gateway; retry after Retry-After"),
    "503": _answer("not deployed, or the registry or Kafka cannot answer"),
}
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
_READINESS = {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
_TENSOR_SHAPE: dict[str, Any] = {
    "name": {"type": "string"},
    "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}},
}
_TENSOR_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": _TENSOR_SHAPE,
}


def _model_paths(suffix: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The same operation on /v2/models/{model}<suffix> and /v2/models/{model}/versions/{version}<suffix>."""
    paths = {}
    for prefix, parameters, name in (
        ("/v2/models/{model}", [_MODEL], ""),
        ("/v2/models/{model}/versions/{version}", [_MODEL, _VERSION], "Version"),
    ):
        paths[prefix + suffix] = {
            method: {**operation, "operationId": operation["operationId"] + name, "parameters": parameters}
        }
    return paths


_ARROW = {"type": "string", "format": "binary"}
_RECORDS = {"type": "array", "items": {"type": "object"}}


def _records(description: str) -> dict[str, Any]:
    """An answer of result rows, in the format of the request."""
    return {
        "description": description,
        "content": {
            "application/json": {"schema": _RECORDS},
            "application/vnd.apache.arrow.file": {"schema": _ARROW},
            "application/vnd.apache.arrow.stream": {"schema": _ARROW},
        },
    }


_RECORDS_INFER = {
    "post": {
        "operationId": "pipelineInfer",
        "description": "Wallaroo's endpoint: input records as pandas records JSON (a list of objects, as "
        'DataFrame.to_json(orient="records") writes) or an Arrow IPC table, answered with the SDK\'s '
        "pipeline.infer result rows (time, in.*, out.*, check_failures, anomaly.*, metadata.*, error) in the "
        "same format.",
        "security": _SECURED,
        "parameters": [
            {"name": "workspace", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "pipeline", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "timeout",
                "in": "query",
                "required": False,
                "description": "the request's deadline, in seconds",
                "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _RECORDS},
                "application/vnd.apache.arrow.file": {"schema": _ARROW},
                "application/vnd.apache.arrow.stream": {"schema": _ARROW},
            },
        },
        "responses": {
            "200": _records("one result row per input record, in order; a record refused has its error"),
            "400": _answer("a malformed body, or records naming none of the pipeline's inputs"),
            "413": _answer("a body, its records, or a record over the limits"),
            "415": _answer("a Content-Type other than JSON records or Arrow IPC"),
            "504": _answer("the pipeline did not answer every record by the deadline"),
            **_REFUSALS,
            "404": _answer("no such pipeline, not deployed, or a workspace the caller is not a member of"),
        },
    }
}


DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Joey inference gateway (Open Inference Protocol REST)",
        "version": "2",
        "description": "Every deployed pipeline is a model; <workspace>.<pipeline> names one of any "
        "workspace.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "InferInput": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string", "enum": list(DATATYPES)},
                    "parameters": {"type": "object"},
                    "data": {"type": "array"},
                },
            },
            "InferRequest": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferInput"}},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                        },
                    },
                },
            },
            "InferResponse": {
                "type": "object",
                "required": ["model_name", "outputs"],
                "properties": {
                    "model_name": {"type": "string"},
                    "model_version": {"type": "string"},
                    "id": {"type": "string"},
                    "outputs": {
                        "type": "array",
                        "items": {
                            **_TENSOR_METADATA,
                            "properties": {
                                **_TENSOR_SHAPE,
                                "parameters": {"type": "object"},
                                "data": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "paths": {
        "/v2/health/live": {
            "get": {
                "operationId": "serverLive",
                "security": [],
                "responses": {
                    "200": _answer(
                        "the gateway is up",
                        {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
                    )
                },
            }
        },
        "/v2/health/ready": {
            "get": {
                "operationId": "serverReady",
                "security": _SECURED,
                "responses": {
                    "200": _answer(
                        "the gateway is up",
                        {
                            "type": "object",
                            "required": ["ready"],
                            "properties": {"ready": {"type": "boolean"}},
                        },
                    ),
                    "401": _REFUSALS["401"],
                    "503": _REFUSALS["503"],
                },
            }
        },
        "/v2": {
            "get": {
                "operationId": "serverMetadata",
                "security": _SECURED,
                "responses": {
                    "200": _answer(
                        "the server's name, version and protocol extensions",
                        {
                            "type": "object",
                            "required": ["name", "version", "extensions"],
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                                "extensions": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                    ),
                    "401": _REFUSALS["401"],
                    "503": _REFUSALS["503"],
                },
            }
        },
        **_model_paths(
            "",
            "get",
            {
                "operationId": "modelMetadata",
                "security": _SECURED,
                "responses": {
                    "200": _answer(
                        "the pipeline's inputs (its first model step's) and outputs (its last's)",
                        {
                            "type": "object",
                            "required": ["name", "versions", "platform", "inputs", "outputs"],
                            "properties": {
                                "name": {"type": "string"},
                                "versions": {"type": "array", "items": {"type": "string"}},
                                "platform": {"type": "string"},
                                "inputs": {"type": "array", "items": _TENSOR_METADATA},
                                "outputs": {"type": "array", "items": _TENSOR_METADATA},
                            },
                        },
                    ),
                    **_REFUSALS,
                },
            },
        ),
        **_model_paths(
            "/ready",
            "get",
            {
                "operationId": "modelReady",
                "security": _SECURED,
                "responses": {
                    "200": _answer("ready: every replica alive, loaded, holding partitions", _READINESS),
                    "400": _answer("not ready", _READINESS),
                    **_REFUSALS,
                },
            },
        ),
        **_model_paths(
            "/infer",
            "post",
            {
                "operationId": "modelInfer",
                "security": _SECURED,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
                    },
                },
                "responses": {
                    "200": _answer(
                        "the outputs, one row per input row (binary tensors follow the JSON header when "
                        "asked for, with Inference-Header-Content-Length)",
                        {"$ref": "#/components/schemas/InferResponse"},
                    ),
                    "400": _answer("a malformed request, a shape that does not fit, or a record refused"),
                    "413": _answer("a body, a request's rows or elements, or a row's record over the limits"),
                    "504": _answer("the pipeline did not answer every row by the deadline"),
                    **_REFUSALS,
                },
            },
        ),
        "/pipelines/{workspace}/{pipeline}/infer": _RECORDS_INFER,
    },
}
