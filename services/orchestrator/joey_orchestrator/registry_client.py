"""The orchestrator's calls to the registry, with the service token: an orchestration's zip, and the
token of each run (issued when it starts, revoked when it ends). Tokens are handed to the run's process
and never logged."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import grpc

from joey_core import tls
from joey_core.v1 import registry_pb2, registry_pb2_grpc
from joey_orchestrator.settings import OrchestratorSettings

TIMEOUT_S = 15.0
DOWNLOAD_TIMEOUT_S = 600.0


class RegistryUnavailable(Exception):
    """A call to the registry failed; the message names the call and the status, never a token."""


def _failed(what: str, exc: grpc.RpcError) -> RegistryUnavailable:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return RegistryUnavailable(f"cannot {what} ({code.name if code else 'error'}: {detail})")


class RegistryClient:
    def __init__(self, settings: OrchestratorSettings) -> None:
        self._settings = settings
        token = settings.service_token.get_secret_value() if settings.service_token else ""
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = tls.channel(settings.registry_addr, settings)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def download(self, workspace: str, name: str, version: int, sha256: str, target: Path) -> None:
        """The version's zip into ``target``, its sha256 checked; written beside it and renamed."""
        request = registry_pb2.OrchestrationRequest(workspace=workspace, name=name, version=version)
        partial = target.with_name(f"{target.name}.{secrets.token_hex(4)}.part")
        digest = hashlib.sha256()
        try:
            with partial.open("wb") as out:
                chunks = self._stub.DownloadOrchestration(
                    request, timeout=DOWNLOAD_TIMEOUT_S, metadata=self._metadata
                )
                for chunk in chunks:
                    digest.update(chunk.data)
                    out.write(chunk.data)
            if digest.hexdigest() != sha256:
                raise RegistryUnavailable(
                    f"the zip of {name!r} version {version} arrived with another sha256"
                )
            os.replace(partial, target)
        except grpc.RpcError as exc:
            raise _failed(f"download orchestration {name!r} version {version}", exc) from None
        finally:
            partial.unlink(missing_ok=True)

    def issue_token(self, run_id: int) -> str:
        try:
            issued = self._stub.IssueTaskToken(
                registry_pb2.TaskTokenRequest(run_id=run_id), timeout=TIMEOUT_S, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _failed(f"get the token of run {run_id}", exc) from None
        return str(issued.token)

    def revoke_token(self, run_id: int) -> None:
        try:
            self._stub.RevokeTaskToken(
                registry_pb2.TaskTokenRequest(run_id=run_id), timeout=TIMEOUT_S, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _failed(f"revoke the token of run {run_id}", exc) from None
