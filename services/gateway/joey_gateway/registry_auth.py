"""Who may call the gateway: the registry decides, asked with the token the caller sent.

The gateway holds no credentials of its own; it forwards the caller's ``Bearer`` token. A positive answer
is reused for at most ``cache_s`` (at most a second, so a revoked token or a deactivated user is refused
within a second). A refusal is never cached, and it erases the earlier "yes" it contradicts (every one of
the token's, when the registry no longer knows the token). A registry that cannot answer (UNAVAILABLE or
DEADLINE_EXCEEDED: down, or its database is) refuses the call, except to a caller it said yes to at most
``outage_grace_s`` ago and has not refused since: a blip of the control plane does not stop inference for
callers already served, and no one it never authorized is let in. Any other answer of the registry stands.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict

import grpc

from joey_core.v1 import registry_pb2 as pb
from joey_core.v1 import registry_pb2_grpc
from joey_gateway import metrics
from joey_gateway.errors import GatewayError, Status

log = logging.getLogger(__name__)

MAX_CACHED = 10_000
"""Positive answers kept at once: bounds the memory a flood of distinct tokens can take."""

REGISTRY_TIMEOUT_S = 10.0

QUIET_S = 1.0
"""After the registry could not answer, how long no one asks it again (the grace serves, or 503)."""

# Visible ASCII only: what an HTTP header and gRPC metadata can carry unchanged.
_TOKEN = re.compile(r"[\x21-\x7e]+")

# The registry's refusals, answered to the caller as they are: NOT_FOUND for a workspace the caller is not a
# member of (the same answer as a missing one, so a non-member learns nothing).
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: Status.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: Status.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: Status.NOT_FOUND,
}
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization`` header (REST) or ``authorization`` metadata (gRPC) value."""
    if not authorization:
        raise GatewayError(
            Status.UNAUTHENTICATED, "no token: send the header 'Authorization: Bearer <token>'"
        )
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        raise GatewayError(
            Status.UNAUTHENTICATED, "malformed Authorization header: expected 'Bearer <token>'"
        )
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata presenting ``token`` to the registry."""
    return (("authorization", f"Bearer {token}"),)


class RegistryUnreachable(GatewayError):
    """The registry could not answer (UNAVAILABLE, DEADLINE_EXCEEDED): the only failure an earlier answer
    may stand in for. Any answer it gave, refusal or error, stands as it is."""

    def __init__(self, details: str) -> None:
        super().__init__(Status.UNAVAILABLE, f"registry unavailable: {details}")


def refusal(exc: grpc.RpcError) -> GatewayError:
    """The gateway's answer to a registry call that failed: its refusal as it is,
    :class:`RegistryUnreachable` when it could not answer, INTERNAL for any other answer (never a pass)."""
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    status = _REFUSALS.get(code)
    if status is not None:
        return GatewayError(status, details)
    if code in _UNREACHABLE:
        return RegistryUnreachable(details)
    log.error("the registry answered %s: %s", code, details)
    return GatewayError(Status.INTERNAL, "the registry failed; see the gateway's log")


class RegistryAuth:
    def __init__(
        self,
        stub: registry_pb2_grpc.RegistryStub,
        cache_s: float,
        outage_grace_s: float = 0.0,
        max_cached: int = MAX_CACHED,
        quiet_s: float = QUIET_S,
    ) -> None:
        self._stub = stub
        self._cache_s = cache_s
        self._outage_grace_s = outage_grace_s
        self._max_cached = max_cached
        self._quiet_s = quiet_s
        self._lock = threading.Lock()
        # (sha256 of the token, workspace, action) -> monotonic time the registry said yes; oldest first.
        # Keyed by the hash so that no token is kept in memory past its request.
        self._granted: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        # Token hash -> its keys in _granted: a token the registry no longer knows loses every "yes" at once.
        self._keys: dict[str, set[tuple[str, str, str]]] = {}
        self._outage_logged = False
        self._quiet_until = 0.0
        """Until then the registry, which could not answer, is not asked for authorization. (Requests that
        arrive while a hung registry is being asked still ask too.)"""
        self._quiet_reason = ""

    def authorize(self, token: str, workspace: str, action: str) -> None:
        """Pass if the caller presenting ``token`` may perform ``action`` ("read" or "infer") in
        ``workspace``, else raise :class:`GatewayError`: UNAUTHENTICATED, NOT_FOUND (not a member),
        PERMISSION_DENIED, or UNAVAILABLE when the registry cannot answer."""
        self._check(token, workspace, action)

    def authenticate(self, token: str) -> None:
        """Pass if ``token`` is valid (a user, whatever their workspaces): the server-level routes."""
        self._check(token, "", "")

    def known(self, token: str) -> bool:
        """Whether ``token`` holds a "yes" of the registry to :meth:`authenticate` younger than ``cache_s``:
        the answer :meth:`authenticate` would reuse, found without any call (nor the outage grace)."""
        key = (hashlib.sha256(token.encode()).hexdigest(), "", "")
        asked = time.monotonic()
        with self._lock:
            granted = self._granted.get(key)
        return granted is not None and asked < granted + self._cache_s

    def _check(self, token: str, workspace: str, action: str) -> None:
        key = (hashlib.sha256(token.encode()).hexdigest(), workspace, action)
        # Counted from before the question: an answer is never reused longer than cache_s after it was asked.
        asked = time.monotonic()
        with self._lock:
            granted = self._granted.get(key)
            if granted is not None:
                if asked < granted + self._cache_s:
                    return
                if asked >= granted + max(self._cache_s, self._outage_grace_s):
                    self._drop(key)
                    granted = None
            quiet = asked < self._quiet_until
            reason = self._quiet_reason
        if quiet:
            if granted is None:
                raise RegistryUnreachable(reason)
            metrics.STALE_ANSWERS.labels("auth").inc()
            return
        metadata = bearer_metadata(token)
        try:
            if workspace:
                self._stub.Authorize(
                    pb.AuthorizeRequest(workspace=workspace, action=action),
                    metadata=metadata,
                    timeout=REGISTRY_TIMEOUT_S,
                )
            else:
                self._stub.WhoAmI(pb.WhoAmIRequest(), metadata=metadata, timeout=REGISTRY_TIMEOUT_S)
        except grpc.RpcError as exc:
            refused = refusal(exc)
            if not isinstance(refused, RegistryUnreachable):
                self._answered()
                if refused.status in _REFUSALS.values():
                    self._revoke(key, refused.status)
                raise refused from None
            with self._lock:
                self._quiet_until = time.monotonic() + self._quiet_s
                self._quiet_reason = exc.details()  # type: ignore[attr-defined]
            if granted is None:
                raise refused from None
            self._outage(refused)
            return
        self._answered()
        if self._cache_s <= 0 and self._outage_grace_s <= 0:
            return
        with self._lock:
            self._granted[key] = asked
            self._granted.move_to_end(key)
            self._keys.setdefault(key[0], set()).add(key)
            while len(self._granted) > self._max_cached:
                self._drop(next(iter(self._granted)))

    def _revoke(self, key: tuple[str, str, str], status: Status) -> None:
        """A refusal overrides every older "yes" it covers, so that no outage can bring one back: of the
        token, whatever the workspace, when the registry no longer knows it; else of this question."""
        with self._lock:
            keys = list(self._keys.get(key[0], ())) if status == Status.UNAUTHENTICATED else [key]
            for each in keys:
                if each in self._granted:
                    self._drop(each)

    def _drop(self, key: tuple[str, str, str]) -> None:
        """Forget one "yes"; the caller holds the lock."""
        del self._granted[key]
        keys = self._keys[key[0]]
        keys.discard(key)
        if not keys:
            del self._keys[key[0]]

    # Both log after releasing the lock: known() takes it on the event loop, which must not wait on a log
    # handler's I/O.
    def _answered(self) -> None:
        with self._lock:
            recovered, self._outage_logged = self._outage_logged, False
        if recovered:
            log.info("the registry answers again; callers are authorized afresh")

    def _outage(self, refused: GatewayError) -> None:
        metrics.STALE_ANSWERS.labels("auth").inc()
        with self._lock:
            first, self._outage_logged = not self._outage_logged, True
        if first:
            log.warning(
                "the registry cannot answer (%s): callers it authorized in the last %.0f s are still "
                "served, no one else",
                refused.message,
                self._outage_grace_s,
            )
