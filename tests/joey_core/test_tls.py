"""TLS of Joey's gRPC channels and servers, against a real gRPC server with a self-signed certificate."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from joey_core import tls
from joey_core.settings import CommonSettings, TlsServerSettings
from tests.certificates import self_signed

_ECHO = "/test.Echo/Say"


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


def _echo_server(settings: TlsServerSettings) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Say": echo}),))
    port = tls.add_port(server, "127.0.0.1:0", settings)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def tls_server(pair: tuple[Path, Path]) -> Iterator[str]:
    cert, key = pair
    server, addr = _echo_server(TlsServerSettings(tls_cert=cert, tls_key=key))
    yield addr
    server.stop(0)


def _say(channel: grpc.Channel) -> bytes:
    return bytes(channel.unary_unary(_ECHO)(b"hello", timeout=5))


def test_a_tls_server_answers_a_client_trusting_its_ca(tls_server: str, pair: tuple[Path, Path]) -> None:
    with tls.channel(tls_server, CommonSettings(tls_ca=pair[0])) as channel:
        assert _say(channel) == b"hello"


def test_a_tls_server_refuses_a_plaintext_client(tls_server: str) -> None:
    with tls.channel(tls_server, CommonSettings()) as channel, pytest.raises(grpc.RpcError) as refused:
        _say(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_system_roots_do_not_trust_a_self_signed_certificate(tls_server: str) -> None:
    with (
        tls.channel(tls_server, CommonSettings(tls=True)) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        _say(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_without_a_certificate_the_server_speaks_plaintext() -> None:
    server, addr = _echo_server(TlsServerSettings())
    try:
        with tls.channel(addr, CommonSettings()) as channel:
            assert _say(channel) == b"hello"
    finally:
        server.stop(0)


def test_the_http_context_serves_the_pair(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    assert tls.server_context(TlsServerSettings()) is None
    context = tls.server_context(TlsServerSettings(tls_cert=cert, tls_key=key))
    assert isinstance(context, ssl.SSLContext) and context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_certificate_needs_its_key_and_files_that_exist(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = pair
    with pytest.raises(ValidationError, match="JOEY_TLS_CERT set without JOEY_TLS_KEY"):
        TlsServerSettings(tls_cert=cert)
    with pytest.raises(ValidationError, match="JOEY_TLS_KEY set without JOEY_TLS_CERT"):
        TlsServerSettings(tls_key=key)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValidationError, match=f"JOEY_TLS_KEY={missing} is not a file"):
        TlsServerSettings(tls_cert=cert, tls_key=missing)
    with pytest.raises(ValidationError, match=f"JOEY_TLS_CA={missing} is not a file"):
        CommonSettings(tls_ca=missing)
