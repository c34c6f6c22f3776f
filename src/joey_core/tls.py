"""TLS of Joey's own ports: gRPC channels to the registry, and the credentials of the servers.

A server speaks TLS when its settings name a certificate and key (``JOEY_TLS_CERT`` / ``JOEY_TLS_KEY``);
a client uses TLS when ``JOEY_TLS_CA`` names the CA bundle to check the server against, or
``JOEY_TLS=true`` says to check it against the system's roots. Without them, plaintext: fine on loopback,
where everything listens by default.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

import grpc

from joey_core.settings import CommonSettings, TlsServerSettings

ChannelOptions = Sequence[tuple[str, Any]]


def uses_tls(settings: CommonSettings) -> bool:
    return settings.tls or settings.tls_ca is not None


def channel(addr: str, settings: CommonSettings, options: ChannelOptions = ()) -> grpc.Channel:
    """A channel to the registry at ``addr``, over TLS when the client's settings ask for it."""
    if not uses_tls(settings):
        return grpc.insecure_channel(addr, options=options)
    roots = settings.tls_ca.read_bytes() if settings.tls_ca is not None else None
    return grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=roots), options=options)


def server_credentials(settings: TlsServerSettings) -> grpc.ServerCredentials | None:
    """The gRPC server's credentials; None when it serves plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])


def add_port(server: grpc.Server, addr: str, settings: TlsServerSettings) -> int:
    """Listen on ``addr``, over TLS when the settings name a certificate; the bound port (0: failed)."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(addr)
    return server.add_secure_port(addr, credentials)


def server_context(settings: TlsServerSettings) -> ssl.SSLContext | None:
    """The HTTP server's TLS context; None when it serves plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context
