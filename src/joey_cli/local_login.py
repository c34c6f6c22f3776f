"""`joey up` logs the local stack's platform admin in, so that `make demo`, the README's commands and
``joey.Client()`` work with no prompt.

Once the registry is ready, unless the credentials file already holds a token the registry accepts for
its address: log in as `admin` with the stack's admin password, create an API token named after the
address (a session would expire after 12 h while the stack runs on), log the session out, and store
the token. An older token of that name (whose secret was in an entry that no longer works) is revoked
first. `joey logout` revokes the stored token; the next `joey up` makes a new one.

Raw gRPC, not the SDK: this runs in `joey up`'s long-lived supervisor, which never loads pandas.
"""

from __future__ import annotations

import re

import grpc

from joey_core import tls
from joey_core.credentials import Credential, CredentialsError, CredentialsFile
from joey_core.settings import CommonSettings
from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc

ADMIN = "admin"
TIMEOUT_S = 30.0


def token_name(registry_addr: str) -> str:
    """``joey-up-127.0.0.1-50051``: one token per stack address, even when stacks share a database."""
    return "joey-up-" + re.sub(r"[^A-Za-z0-9._-]+", "-", registry_addr).strip("-")[:54]


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _accepted(stub: registry_pb2_grpc.RegistryStub, token: str) -> bool:
    try:
        stub.WhoAmI(pb.WhoAmIRequest(), timeout=TIMEOUT_S, metadata=_bearer(token))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise
    return True


def log_in_admin(
    registry_addr: str,
    password: str,
    credentials: CredentialsFile | None = None,
    settings: CommonSettings | None = None,
) -> str:
    """Store a token of `admin` for ``registry_addr`` unless a working one is stored; says who is
    logged in, or why no one is (never raises: a stack that runs is worth more than a login)."""
    credentials = credentials or CredentialsFile()
    try:
        with tls.channel(registry_addr, settings or CommonSettings()) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            stored = credentials.get(registry_addr)
            if stored is not None and _accepted(stub, stored.token):
                return f"{stored.username} (token in {credentials.path})"
            login = stub.Login(pb.LoginRequest(username=ADMIN, password=password), timeout=TIMEOUT_S)
            session = _bearer(login.token)
            name = token_name(registry_addr)
            try:
                stub.RevokeToken(pb.RevokeTokenRequest(name=name), timeout=TIMEOUT_S, metadata=session)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            created = stub.CreateToken(pb.CreateTokenRequest(name=name), timeout=TIMEOUT_S, metadata=session)
            try:
                credentials.put(registry_addr, Credential(ADMIN, created.token, api_token_name=name))
            except BaseException:
                # Nobody could use or revoke it by its secret.
                stub.RevokeToken(pb.RevokeTokenRequest(name=name), timeout=TIMEOUT_S, metadata=session)
                raise
            finally:
                stub.Logout(pb.LogoutRequest(), timeout=TIMEOUT_S, metadata=session)
            return f"{ADMIN} (token in {credentials.path})"
    except grpc.RpcError as exc:
        reason = exc.details()  # type: ignore[attr-defined]  # never a secret: errors name none
    except (CredentialsError, OSError) as exc:
        reason = str(exc)
    return f"nobody: logging in as {ADMIN} failed ({reason}); log in with `joey login`"
