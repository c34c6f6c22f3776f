"""Which token a :class:`joey.Client` presents: the one given to it, else ``JOEY_TOKEN``, else the
credentials file's entry for its registry (written by `joey login` and `joey up`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from joey.client.calls import JoeyError
from joey_core.credentials import CredentialsError, CredentialsFile, default_path


@dataclass(frozen=True)
class Bearer:
    """The gRPC metadata of every call, and which token it is, for the error when it is refused."""

    metadata: tuple[tuple[str, str], ...] = field(repr=False)
    sent: str
    """E.g. "the token sent was JOEY_TOKEN's"; never the token itself."""

    @classmethod
    def of(cls, token: str, source: str) -> Bearer:
        return cls((("authorization", f"Bearer {token}"),), f"the token sent was {source}")

    @classmethod
    def resolve(
        cls, token: str | None, registry_addr: str, environ: Mapping[str, str] = os.environ
    ) -> Bearer:
        if token:
            return cls.of(token, "the one given to joey.Client")
        if environ.get("JOEY_TOKEN"):
            return cls.of(environ["JOEY_TOKEN"], "JOEY_TOKEN's")
        credentials = CredentialsFile(default_path(environ))
        try:
            stored = credentials.get(registry_addr)
        except CredentialsError as exc:
            raise JoeyError("UNAUTHENTICATED", str(exc)) from None
        if stored is not None:
            return cls.of(stored.token, f"the one stored for {registry_addr} in {credentials.path}")
        return cls(
            (),
            f"no token was sent: none given, no JOEY_TOKEN, none stored for {registry_addr} in "
            f"{credentials.path}",
        )
