"""Settings of the assayer service."""

from __future__ import annotations

from pydantic import Field

from joey_core import topics
from joey_core.settings import DatabaseSettings, ServiceSettings


class AssayerSettings(ServiceSettings, DatabaseSettings):
    assayer_group: str = topics.ASSAYER_GROUP
    """Consumer group of the assayers on joey.logs."""

    logger_group: str = topics.LOGGER_GROUP
    """Consumer group of the loggers whose committed offsets tell which log records are stored."""

    allowed_lateness_s: float = Field(default=60.0, ge=0)
    """How long after a window's end (in event time, or on the wall clock) records may still
    arrive for it; the window is scored only then."""

    tick_s: float = Field(default=1.0, gt=0)
    """Pause between two looks for windows that have closed."""

    max_windows_per_tick: int = Field(default=100, ge=1)
    """Most windows scored between two polls of joey.logs (a long backlog is worked off in steps)."""
