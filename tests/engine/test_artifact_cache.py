from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import pytest

from joey_core.settings import CommonSettings
from joey_engine.artifact_cache import ArtifactCache, ArtifactError


@pytest.fixture
def server(artifact_server: tuple[Any, str]) -> Any:
    return artifact_server[0]


@pytest.fixture
def store(artifact_server: tuple[Any, str], tmp_path: Path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", artifact_server[1], CommonSettings())


def test_fetches_in_chunks_and_reuses_the_cache(server: Any, store: ArtifactCache) -> None:
    data = secrets.token_bytes(2 * (1 << 20) + 123)  # three chunks
    sha = server.add(data)
    path = store.fetch("ws", sha)
    assert path.name == sha and path.read_bytes() == data
    assert store.fetch("ws", sha) == path
    assert server.downloads.count(sha) == 1
    assert [p.name for p in path.parent.iterdir()] == [sha]


def test_sha_mismatch_is_an_error_and_nothing_is_kept(
    server: Any, store: ArtifactCache, tmp_path: Path
) -> None:
    claimed = hashlib.sha256(b"the real model").hexdigest()
    server.artifacts[claimed] = b"something else"
    with pytest.raises(ArtifactError, match=f"artifact {claimed} from the registry has sha256 "):
        store.fetch("ws", claimed)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_artifact_names_the_registry_error(store: ArtifactCache) -> None:
    with pytest.raises(ArtifactError, match="NOT_FOUND no artifact"):
        store.fetch("ws", "ab" * 32)


def test_invalid_sha_is_refused_without_a_call(server: Any, store: ArtifactCache) -> None:
    before = len(server.downloads)
    with pytest.raises(ArtifactError, match="invalid artifact sha256"):
        store.fetch("ws", "../../etc/passwd")
    assert len(server.downloads) == before


def test_a_tampered_cache_file_is_fetched_again(server: Any, store: ArtifactCache) -> None:
    data = secrets.token_bytes(1000)
    sha = server.add(data)
    path = store.fetch("ws", sha)
    path.write_bytes(b"another pipeline's model")
    assert store.fetch("ws", sha).read_bytes() == data
    assert server.downloads.count(sha) == 2
