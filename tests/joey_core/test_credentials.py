"""The credentials file: one entry per registry, private to its owner, replaced atomically."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from joey_core.credentials import Credential, CredentialsError, CredentialsFile, default_path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_where_the_file_is() -> None:
    assert default_path({"JOEY_CREDENTIALS": "/x/creds", "XDG_CONFIG_HOME": "/cfg"}) == Path("/x/creds")
    assert default_path({"XDG_CONFIG_HOME": "/cfg"}) == Path("/cfg/joey/credentials")
    assert default_path({}) == Path.home() / ".config" / "joey" / "credentials"


def test_entries_per_registry_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "config" / "joey" / "credentials"
    credentials = CredentialsFile(path)
    assert credentials.get("127.0.0.1:50051") is None, "no file: no entry"

    credentials.put("127.0.0.1:50051", Credential("admin", "joey_a"))
    credentials.put("registry.example:443", Credential("alice", "joey_b"))
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert json.loads(path.read_text()) == {
        "127.0.0.1:50051": {"username": "admin", "token": "joey_a"},
        "registry.example:443": {"username": "alice", "token": "joey_b"},
    }
    assert credentials.get("127.0.0.1:50051") == Credential("admin", "joey_a")

    credentials.put("127.0.0.1:50051", Credential("bob", "joey_c"))
    assert credentials.get("127.0.0.1:50051") == Credential("bob", "joey_c"), "replaced"
    assert credentials.remove("127.0.0.1:50051")
    assert not credentials.remove("127.0.0.1:50051")
    assert credentials.get("127.0.0.1:50051") is None
    assert credentials.get("registry.example:443") == Credential("alice", "joey_b"), "the other entry stays"
    assert "joey_b" not in repr(credentials.get("registry.example:443")), "a repr never shows the token"


def test_a_rewrite_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    credentials = CredentialsFile(path)
    credentials.put("a:1", Credential("admin", "joey_a"))
    before = path.stat().st_ino
    credentials.put("b:2", Credential("admin", "joey_b"))
    # A new file renamed over the old one: a reader holds the old or the new, never half of one.
    assert path.stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials"]


def test_concurrent_writers_keep_every_entry(tmp_path: Path) -> None:
    credentials = CredentialsFile(tmp_path / "credentials")
    threads = [
        threading.Thread(target=credentials.put, args=(f"host:{i}", Credential("u", f"joey_{i}")))
        for i in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(credentials.get(f"host:{i}") == Credential("u", f"joey_{i}") for i in range(20))


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    credentials = CredentialsFile(path)
    credentials.put("a:1", Credential("admin", "joey_a"))
    os.chmod(path, 0o644)
    with pytest.raises(CredentialsError, match=r"may be read by other users \(mode 0644\).*chmod 600"):
        credentials.get("a:1")
    with pytest.raises(CredentialsError):
        credentials.put("b:2", Credential("admin", "joey_b"))
    os.chmod(path, 0o600)
    assert credentials.get("a:1") == Credential("admin", "joey_a")


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"a:1": {"token": "joey_x"}}'])
def test_a_malformed_file_says_what_to_do(tmp_path: Path, text: str) -> None:
    path = tmp_path / "credentials"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(CredentialsError, match="log in again with `joey login`"):
        CredentialsFile(path).get("a:1")
