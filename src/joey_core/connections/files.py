"""``files``: a local directory (of the host that reads or writes it), with a file-name pattern."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from joey_core.connections.base import ConnectionType, InvalidDetails, Probe, Report, Rolling, register

MAX_COUNTED = 100_000
"""Files a test counts at most: a test of a huge directory answers in bounded time."""


class FilesDetails(Rolling):
    path: str = Field(min_length=1, max_length=4096)
    """An absolute directory."""
    pattern: str = Field(default="*", min_length=1, max_length=256)
    """Which of its files, as a glob (``*.parquet``); matched in the directory itself."""
    format: Literal["csv", "jsonl", "parquet"] | None = None


@register
class Files(ConnectionType):
    name = "files"
    details = FilesDetails

    def check(self, details: Any) -> None:
        assert isinstance(details, FilesDetails)
        if not os.path.isabs(details.path):
            raise InvalidDetails("path", "must be an absolute directory")
        if "/" in details.pattern:
            raise InvalidDetails("pattern", "matches names in the directory: no '/'")

    def probe(self, details: Mapping[str, Any]) -> Probe:
        return Probe(directories=(details["path"],))

    def test(self, details: Mapping[str, Any], timeout_s: float) -> Report:
        path = Path(details["path"])
        if not path.is_dir():
            return Report(False, f"{path} is not a directory", {"exists": False})
        count = 0
        try:
            for entry in path.glob(details.get("pattern", "*")):
                if entry.is_file():
                    count += 1
                    if count >= MAX_COUNTED:
                        break
        except OSError as exc:
            return Report(False, f"cannot read {path}: {exc.strerror}", {"exists": True})
        more = "+" if count >= MAX_COUNTED else ""
        return Report(
            True,
            f"directory {path} exists: {count}{more} files matching {details.get('pattern', '*')!r}",
            {"exists": True, "files": count},
        )
