"""The secrets of a laptop stack, made by `joey up` on its first start and kept in its state directory.

The platform admin's password (the registry creates `admin` with it while no user exists), the
service token the engines, connector-bridges and orchestrators present to the registry, and the
Fernet key the registry seals connection secrets with. Each is a file readable by its owner only;
one given in the environment (JOEY_ADMIN_PASSWORD, JOEY_SERVICE_TOKEN, JOEY_SECRET_KEY) is used
instead. Losing `secret-key` loses the connections' secrets (their other details stay): back it up
with the database.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ADMIN_PASSWORD_FILE = "admin-password"  # noqa: S105 (a file name)
SERVICE_TOKEN_FILE = "service-token"  # noqa: S105 (a file name)
SECRET_KEY_FILE = "secret-key"  # noqa: S105 (a file name)


def _secret(path: Path, make: str) -> str:
    """The file's secret, or ``make`` written there (mode 0600) if it does not exist yet or holds
    none (an empty file, as a crash while writing it leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        kept = path.read_text().strip()
        if kept:
            return kept
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(make + "\n")
    return make


def admin_password(state_dir: Path) -> str:
    return os.environ.get("JOEY_ADMIN_PASSWORD") or _secret(
        state_dir / ADMIN_PASSWORD_FILE, secrets.token_urlsafe(24)
    )


def service_token(state_dir: Path) -> str:
    return os.environ.get("JOEY_SERVICE_TOKEN") or _secret(
        state_dir / SERVICE_TOKEN_FILE, "joey_" + secrets.token_urlsafe(32)
    )


def secret_key(state_dir: Path) -> str:
    from cryptography.fernet import Fernet

    return os.environ.get("JOEY_SECRET_KEY") or _secret(
        state_dir / SECRET_KEY_FILE, Fernet.generate_key().decode()
    )


def service_env(name: str, state_dir: Path) -> dict[str, str]:
    """The secrets service ``name`` needs, as environment variables: only those it uses."""
    if name == "registry":
        return {
            "JOEY_ADMIN_PASSWORD": admin_password(state_dir),
            "JOEY_SERVICE_TOKEN": service_token(state_dir),
            "JOEY_SECRET_KEY": secret_key(state_dir),
        }
    if name in ("engine", "connector-bridge", "orchestrator"):
        return {"JOEY_SERVICE_TOKEN": service_token(state_dir)}
    return {}
