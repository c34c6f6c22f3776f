"""The registry over TLS: answered by a client that trusts its certificate, refused by a plaintext one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from joey.client.calls import JoeyError
from joey.client.client import Client
from joey_core.settings import CommonSettings
from joey_registry.app import RegistryServer
from joey_registry.settings import RegistrySettings
from tests.certificates import self_signed


@pytest.fixture(scope="module")
def tls_registry(
    registry_settings: RegistrySettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    server = RegistryServer(registry_settings.model_copy(update={"tls_cert": cert, "tls_key": key}))
    server.start()
    yield f"127.0.0.1:{server.port}", cert
    server.stop()


def test_a_client_trusting_the_certificate_is_answered(tls_registry: tuple[str, Path]) -> None:
    addr, cert = tls_registry
    with Client(addr, settings=CommonSettings(tls_ca=cert)) as client:
        assert "default" in client.list_workspaces()


@pytest.mark.parametrize(
    "client_settings", [{}, {"tls": True}], ids=["plaintext", "TLS trusting only the system's roots"]
)
def test_any_other_client_is_refused(tls_registry: tuple[str, Path], client_settings: dict[str, Any]) -> None:
    addr, _ = tls_registry
    with (
        Client(addr, settings=CommonSettings(**client_settings)) as client,
        pytest.raises(JoeyError) as refused,
    ):
        client.list_workspaces()
    assert refused.value.code == "UNAVAILABLE"
