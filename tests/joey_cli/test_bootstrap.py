from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from joey_cli import bootstrap


def test_secrets_are_made_once_readable_by_the_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOEY_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("JOEY_SERVICE_TOKEN", raising=False)
    monkeypatch.delenv("JOEY_SECRET_KEY", raising=False)
    registry = bootstrap.service_env("registry", tmp_path)
    assert len(registry["JOEY_ADMIN_PASSWORD"]) >= 12
    assert registry["JOEY_SERVICE_TOKEN"].startswith("joey_")
    Fernet(registry["JOEY_SECRET_KEY"].encode())  # a key the registry can seal with
    for name in (bootstrap.ADMIN_PASSWORD_FILE, bootstrap.SERVICE_TOKEN_FILE, bootstrap.SECRET_KEY_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert bootstrap.service_env("registry", tmp_path) == registry
    assert bootstrap.service_env("engine", tmp_path) == {"JOEY_SERVICE_TOKEN": registry["JOEY_SERVICE_TOKEN"]}
    assert bootstrap.service_env("gateway", tmp_path) == {}


def test_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOEY_ADMIN_PASSWORD", "given-admin-password")
    assert bootstrap.admin_password(tmp_path) == "given-admin-password"
    assert not (tmp_path / bootstrap.ADMIN_PASSWORD_FILE).exists()


def test_an_empty_secrets_file_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOEY_SERVICE_TOKEN", raising=False)
    path = tmp_path / bootstrap.SERVICE_TOKEN_FILE
    path.write_text(" \n")
    path.chmod(0o644)
    token = bootstrap.service_token(tmp_path)
    assert token.startswith("joey_")
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
