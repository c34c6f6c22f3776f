"""Connection secrets across a key rotation, on the in-process registry (whose key is the session's)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import psycopg
import pytest
from cryptography.fernet import Fernet
from google.protobuf.struct_pb2 import Struct
from pydantic import SecretStr

from joey_core.connections import Sealer
from joey_core.v1 import registry_pb2 as pb
from joey_registry.access import Access
from joey_registry.connections import Connections
from joey_registry.settings import RegistrySettings
from joey_registry.store import Store
from tests.conftest import SECRET_KEY
from tests.registry.helpers import Stub


def test_a_rotation_seals_every_connection_under_the_new_key(
    stub: Stub, registry_settings: RegistrySettings, database_url: str
) -> None:
    ws = stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=f"rotate-{secrets.token_hex(3)}")).name
    details = Struct()
    details.update({"bucket": "rotated", "access_key_id": "AKIA", "secret_access_key": "rotating-secret"})
    stub.CreateConnection(pb.ConnectionCreateRequest(workspace=ws, name="lake", type="s3", details=details))

    new = Fernet.generate_key().decode()
    with rotation(registry_settings, database_url, f"{new},{SECRET_KEY}") as resealed:
        assert resealed >= 1
    try:
        check_sealed_under(new, stub, ws, database_url)
    finally:
        # The session's other connections, sealed under the new key too, go back to the session's key.
        with rotation(registry_settings, database_url, f"{SECRET_KEY},{new}"):
            pass


@contextmanager
def rotation(settings: RegistrySettings, database_url: str, keys: str) -> Iterator[int]:
    """What a registry starting with ``keys`` does: the number of connections it sealed again."""
    store = Store(database_url, max_size=1)
    store.open()
    try:
        rotated = settings.model_copy(update={"secret_key": SecretStr(keys)})
        yield Connections(rotated, store, Access(store)).reseal()
    finally:
        store.close()


def check_sealed_under(new: str, stub: Stub, ws: str, database_url: str) -> None:
    with psycopg.connect(database_url) as db:
        row = db.execute(
            "SELECT c.details, c.secrets FROM connections c JOIN workspaces w ON w.id = c.workspace_id "
            "WHERE w.name = %s",
            (ws,),
        ).fetchone()
    assert row is not None
    assert Sealer([new]).unseal(row[0], row[1])["secret_access_key"] == "rotating-secret"
    # The registry holding only the old key can no longer open them, and says so.
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetConnection(pb.ConnectionGetRequest(workspace=ws, name="lake"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "no longer holds" in caught.value.details()  # type: ignore[attr-defined]
    stub.DeleteConnection(pb.ConnectionDeleteRequest(workspace=ws, name="lake"))
    stub.DeleteWorkspace(pb.DeleteWorkspaceRequest(name=ws))
