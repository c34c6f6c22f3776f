"""The registry's settings refuse combinations it could not serve."""

from __future__ import annotations

import pydantic
import pytest

from joey_registry.settings import RegistrySettings


def test_uploads_cannot_take_every_thread(env: dict[str, str]) -> None:
    given = {k.removeprefix("JOEY_").lower(): v for k, v in env.items()}
    with pytest.raises(pydantic.ValidationError) as info:
        RegistrySettings(**(given | {"grpc_max_workers": 8, "upload_concurrency": 8}))
    assert "JOEY_UPLOAD_CONCURRENCY (8) must be below JOEY_GRPC_MAX_WORKERS (8)" in str(info.value)
    settings = RegistrySettings(**(given | {"grpc_max_workers": 8, "upload_concurrency": 7}))
    assert settings.upload_concurrency == 7


@pytest.mark.parametrize(("workers", "expected"), [(1, 1), (2, 1), (4, 3), (5, 4), (16, 4)])
def test_an_unset_upload_concurrency_fits_the_workers(
    env: dict[str, str], workers: int, expected: int
) -> None:
    given = {k.removeprefix("JOEY_").lower(): v for k, v in env.items()}
    given.pop("upload_concurrency", None)
    assert RegistrySettings(**(given | {"grpc_max_workers": workers})).upload_concurrency == expected


def test_a_secret_key_that_is_no_fernet_key_is_refused_without_showing_it(env: dict[str, str]) -> None:
    given = {k.removeprefix("JOEY_").lower(): v for k, v in env.items()}
    with pytest.raises(pydantic.ValidationError) as info:
        RegistrySettings(**(given | {"secret_key": f"{env['JOEY_SECRET_KEY']},not-a-fernet-key"}))
    assert "secret_key" in str(info.value) and "Fernet keys" in str(info.value)
    assert "not-a-fernet-key" not in str(info.value)
