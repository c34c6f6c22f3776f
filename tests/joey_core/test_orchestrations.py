"""What an orchestration zip may hold, checked on real zip files: the limits, the one-folder layout,
and extraction that holds the limits on the bytes."""

from __future__ import annotations

import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from joey_core import orchestrations as core

LIMITS = core.ZipLimits(max_files=10, max_unpacked_bytes=1000)


def zipped(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_a_zip_beyond_the_limits_is_refused(tmp_path: Path) -> None:
    many = zipped(tmp_path / "many.zip", {"main.py": b""} | {f"f{i}.txt": b"" for i in range(10)})
    with pytest.raises(core.BadZip, match="11 entries, more than the limit of 10"):
        core.check_zip(many, LIMITS)
    # 2 KB of zeros compress to a few bytes: the files' size counts, not the zip's.
    big = zipped(tmp_path / "big.zip", {"main.py": b"", "data.bin": bytes(2000)})
    assert big.stat().st_size < 1000
    with pytest.raises(core.BadZip, match="more than the limit of 1000 bytes"):
        core.check_zip(big, LIMITS)
    with pytest.raises(core.BadZip, match="appears twice"):
        with zipfile.ZipFile(tmp_path / "twice.zip", "w") as archive:
            archive.writestr("main.py", "")
            with pytest.warns(UserWarning):
                archive.writestr("main.py", "")
        core.check_zip(tmp_path / "twice.zip", LIMITS)


def test_a_zip_of_one_folder_extracts_as_its_contents(tmp_path: Path) -> None:
    path = zipped(tmp_path / "job.zip", {"job/main.py": b"print(1)", "job/lib/util.py": b"X = 1"})
    summary = core.extract(path, tmp_path / "out", LIMITS)
    assert (summary.files, summary.root) == (2, "job/")
    assert (tmp_path / "out" / "main.py").read_bytes() == b"print(1)"
    assert (tmp_path / "out" / "lib" / "util.py").read_bytes() == b"X = 1"
    with pytest.raises(core.BadZip, match="no main.py"):
        core.check_zip(zipped(tmp_path / "two.zip", {"a/main.py": b"", "b/x.py": b""}), LIMITS)
    with pytest.raises(core.BadZip, match="'lib' is a file and a directory"):
        core.check_zip(zipped(tmp_path / "clash.zip", {"main.py": b"", "lib": b"", "lib/x.py": b""}), LIMITS)


def test_schedules_are_checked_and_their_instants_found() -> None:
    assert core.check_schedule(" 0  2 * * * ") == "0 2 * * *"
    for bad in ("", "0 2 * *", "61 * * * *", "every day"):
        with pytest.raises(ValueError, match="schedule"):
            core.check_schedule(bad)
    at_two = datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    assert core.latest_instant("0 2 * * *", at_two) == at_two  # an instant is its own latest
    assert core.next_instant("0 2 * * *", at_two) == datetime(2026, 1, 3, 2, 0, tzinfo=UTC)
    assert core.latest_instant("* * * * * */10", datetime(2026, 1, 2, 2, 0, 17, tzinfo=UTC)).second == 10
