"""The gateway over TLS: REST over https and gRPC over TLS with its certificate, nothing in plaintext."""

from __future__ import annotations

import os
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from joey_core import heartbeats
from tests.certificates import self_signed
from tests.conftest import ServiceProcess, free_port, wait_until


@dataclass
class TlsGateway:
    process: ServiceProcess
    grpc_addr: str
    http_addr: str
    cert: Path


def _headers() -> dict[str, str]:
    token = os.environ.get("JOEY_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def gateway(
    env: dict[str, str],
    service_factory: Callable[..., ServiceProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TlsGateway]:
    cert, key = self_signed(tmp_path_factory.mktemp("gateway-tls"))
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    instance = f"gateway-tls-{secrets.token_hex(3)}"
    process = service_factory(
        "gateway",
        JOEY_OIP_GRPC_ADDR=grpc_addr,
        JOEY_OIP_HTTP_ADDR=http_addr,
        JOEY_TLS_CERT=str(cert),
        JOEY_TLS_KEY=str(key),
        JOEY_INSTANCE_ID=instance,
        JOEY_METRICS_PORT=str(free_port()),
    )
    client = redis.Redis.from_url(env["JOEY_REDIS_URL"])
    wait_until(
        lambda: instance in heartbeats.live_services(client, env["JOEY_REDIS_PREFIX"], "gateway"),
        60,
        "the TLS gateway ready",
        0.1,
    )
    yield TlsGateway(process, grpc_addr, http_addr, cert)
    process.stop()


def _live_over_https(gateway: TlsGateway) -> int:
    context = ssl.create_default_context(cafile=gateway.cert)
    request = urllib.request.Request(f"https://{gateway.http_addr}/v2/health/live", headers=_headers())
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return int(response.status)


def test_rest_is_served_over_https_to_a_client_trusting_the_certificate(gateway: TlsGateway) -> None:
    assert _live_over_https(gateway) == 200


def test_rest_refuses_plain_http_and_untrusting_clients(gateway: TlsGateway) -> None:
    plain = urllib.request.Request(f"http://{gateway.http_addr}/v2/health/live", headers=_headers())
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plain, timeout=10)
    https = urllib.request.Request(f"https://{gateway.http_addr}/v2/health/live", headers=_headers())
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(https, timeout=10, context=ssl.create_default_context())
    assert gateway.process.alive()


def test_grpc_is_served_over_tls_and_refused_in_plaintext(gateway: TlsGateway) -> None:
    # tritonclient's stubs, not Joey's: both register the same proto names, and the gateway tests load these.
    secure = grpcclient.InferenceServerClient(
        gateway.grpc_addr, ssl=True, root_certificates=str(gateway.cert)
    )
    assert secure.is_server_live(headers=_headers())
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        grpcclient.InferenceServerClient(gateway.grpc_addr).is_server_live(headers=_headers())


def test_the_log_says_tls_and_metrics_listen_on_loopback(gateway: TlsGateway) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{gateway.http_addr}/v2/health/live", timeout=10)
    # A failed handshake costs the server nothing: it still answers a client speaking TLS.
    assert _live_over_https(gateway) == 200
    log = gateway.process.log_text()
    assert "(TLS)" in log and "metrics on 127.0.0.1 port" in log and "Traceback" not in log
