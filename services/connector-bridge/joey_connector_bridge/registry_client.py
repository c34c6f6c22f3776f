"""The one call a connector-bridge makes to the registry: a bridge's connection, in full, with the
service token. The details are handed to the source or sink and never logged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from joey_connector_bridge.connectors import Unavailable
from joey_connector_bridge.settings import BridgeSettings
from joey_core import structs, tls
from joey_core.bridges import BridgeSpec
from joey_core.v1 import registry_pb2, registry_pb2_grpc

TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ConnectionDetails:
    type: str
    details: dict[str, Any]

    def __repr__(self) -> str:
        return f"ConnectionDetails({self.type}, ...)"


class RegistryClient:
    def __init__(self, settings: BridgeSettings) -> None:
        self._settings = settings
        token = settings.service_token.get_secret_value() if settings.service_token else ""
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def connection(self, spec: BridgeSpec) -> ConnectionDetails:
        request = registry_pb2.BridgeRequest(workspace=spec.workspace, name=spec.name)
        try:
            with tls.channel(self._settings.registry_addr, self._settings) as channel:
                found = registry_pb2_grpc.RegistryStub(channel).GetBridgeConnection(
                    request, timeout=TIMEOUT_S, metadata=self._metadata
                )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise Unavailable(
                f"cannot read connection {spec.connection!r} from the registry "
                f"({code.name if code else 'error'}: {detail})"
            ) from None
        return ConnectionDetails(found.type, structs.plain(found.details))
