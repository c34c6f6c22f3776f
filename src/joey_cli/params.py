"""Option types of the `joey` command: a value that does not parse is a usage error naming it, not a
traceback."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import click

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)


class Duration(click.ParamType):
    """Seconds, or a number with a unit: 90s, 30m, 12h, 7d."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
        if not match or int(match[1]) == 0:
            self.fail(f"{value!r} is not a duration, e.g. 3600, 30m, 12h or 7d", param, ctx)
        return int(match[1]) * _UNITS[match[2] or "s"]


class IsoTime(click.ParamType):
    """An ISO 8601 time."""

    name = "ISO time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO time, e.g. 2026-12-01T09:00:00Z", param, ctx)


class Since(IsoTime):
    """An ISO time, or a duration back from now (30m, 12h, 7d)."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and re.fullmatch(r"\d+[smhd]", value.strip()):
            return datetime.now(UTC) - timedelta(seconds=Duration().convert(value, param, ctx))
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(
                f"{value!r} is neither an ISO time (2026-12-01T09:00:00Z) nor a duration (30m, 7d)",
                param,
                ctx,
            )
