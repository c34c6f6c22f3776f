"""Which orchestrations share an environment: only those whose requirements install nothing of the zip."""

from __future__ import annotations

from pathlib import Path

import pytest

from joey_orchestrator.packaging import requirements_key

# Each installs files of the zip (or of a location the zip's text does not pin): a key of its own per zip.
FROM_THE_ZIP = [
    "-r base.txt\n",
    "-c constraints.txt\npandas\n",
    "vendor/tinypkg\n",
    "./vendor/tinypkg\n",
    "-e vendor/tinypkg\n",
    "--find-links wheels\ntinypkg\n",
    "tinypkg @ file:///tmp/tinypkg\n",
    "pandas==2.2 \\\n  --hash=sha256:00\n",
]
FROM_AN_INDEX = [
    "pandas==2.2\n",
    "# models\nscikit-learn>=1.4  # the one we trained with\n\nrequests[socks]; python_version > '3.8'\n",
]


def _key(tmp_path: Path, requirements: str, zip_sha256: str) -> str:
    code = tmp_path / zip_sha256
    code.mkdir()
    (code / "requirements.txt").write_text(requirements)
    (code / "base.txt").write_text(f"pandas  # {zip_sha256}\n")
    return requirements_key(code, zip_sha256)


@pytest.mark.parametrize("requirements", FROM_THE_ZIP)
def test_requirements_that_may_install_the_zips_files_are_keyed_by_the_zip(
    tmp_path: Path, requirements: str
) -> None:
    assert _key(tmp_path, requirements, "a" * 64) != _key(tmp_path, requirements, "b" * 64)


@pytest.mark.parametrize("requirements", FROM_AN_INDEX)
def test_plain_requirements_share_one_environment_across_zips(tmp_path: Path, requirements: str) -> None:
    assert _key(tmp_path, requirements, "a" * 64) == _key(tmp_path, requirements, "b" * 64)
