"""Model artifacts, fetched from the registry by sha256 and kept in a local cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import grpc

from joey_core.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(Exception):
    """An artifact could not be fetched or did not match its sha256."""


class ArtifactCache:
    """Files are named by their sha256 and only appear once verified, so a cached file is trusted as is."""

    def __init__(
        self, cache_dir: Path, registry_addr: str, service_token: str | None = None, timeout_s: float = 300.0
    ) -> None:
        self._cache_dir = cache_dir
        self._registry_addr = registry_addr
        self._metadata = (("authorization", f"Bearer {service_token}"),) if service_token else ()
        self._timeout_s = timeout_s

    def fetch(self, workspace: str, sha256: str) -> Path:
        """Local path of the artifact, downloading it from the registry unless cached."""
        if not _SHA256.match(sha256):
            raise ArtifactError(f"invalid artifact sha256 {sha256!r}")
        target = self._cache_dir / sha256
        if target.exists():
            return target
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._cache_dir, prefix=f".{sha256}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out, grpc.insecure_channel(self._registry_addr) as channel:
                request = registry_pb2.DownloadArtifactRequest(workspace=workspace, sha256=sha256)
                for chunk in registry_pb2_grpc.RegistryStub(channel).DownloadArtifact(
                    request, timeout=self._timeout_s, metadata=self._metadata
                ):
                    out.write(chunk.data)
                    digest.update(chunk.data)
                    size += len(chunk.data)
            if digest.hexdigest() != sha256:
                raise ArtifactError(
                    f"artifact {sha256} from the registry has sha256 {digest.hexdigest()} "
                    f"({size} bytes); discarded"
                )
            os.replace(tmp, target)
        except grpc.RpcError as exc:
            raise ArtifactError(
                f"cannot fetch artifact {sha256} of workspace {workspace!r} from the registry at "
                f"{self._registry_addr}: {exc.code().name} {exc.details()}"  # type: ignore[attr-defined]
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        log.info("fetched artifact %s (%d bytes) for workspace %s", sha256, size, workspace)
        return target
