"""Settings of the orchestrator service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from joey_core.settings import DatabaseSettings, ServiceSettings


class OrchestratorSettings(ServiceSettings, DatabaseSettings):
    service_token: SecretStr | None = None
    """The registry's JOEY_SERVICE_TOKEN: presented to download orchestrations and to issue and revoke
    the tokens of runs."""

    orchestrator_dir: Path = Path("~/.local/share/joey/orchestrator")
    """Where the environments (one per requirements), the downloaded zips and the runs' directories live."""

    max_runs: int = Field(default=4, ge=1)
    """Runs this process runs at once."""

    poll_interval_s: float = Field(default=0.5, gt=0)
    """How often schedules are fired, pending runs claimed and lost ones failed."""

    lease_s: float = Field(default=15.0, gt=0)
    """A running run's lease, renewed every third of it: past it unrenewed, another orchestrator fails
    the run (and retries it per its task)."""

    kill_grace_s: float = Field(default=5.0, ge=0)
    """Between SIGTERM and SIGKILL to a run's process group, when it is killed or times out."""

    catch_up: Literal["last", "skip"] = "last"
    """A schedule's instants missed while no orchestrator ran: `last` runs the latest of them once when
    one is back, `skip` runs none (an instant fires only within JOEY_SCHEDULE_GRACE_S of its time)."""

    schedule_grace_s: float = Field(default=60.0, gt=0)
    """With JOEY_CATCH_UP=skip: how late an instant may still fire."""

    retry_backoff_s: float = Field(default=5.0, ge=0)
    """Before the first retry of a failed run; doubled for each further attempt."""

    retry_backoff_max_s: float = Field(default=300.0, ge=0)

    continuous_backoff_s: float = Field(default=1.0, ge=0)
    """Before a continuous task's next run; doubled for each failed run in a row."""

    continuous_backoff_max_s: float = Field(default=60.0, ge=0)

    pip_args: list[str] = Field(default_factory=list)
    """More arguments of `pip install`, as a JSON list: an index of your own
    (`["--index-url", "https://pypi.example.com/simple"]`), or `["--no-index", "--find-links", "/wheels"]`."""

    packaging_timeout_s: float = Field(default=900.0, gt=0)
    """Longest an environment may take to build."""

    max_log_lines: int = Field(default=100_000, ge=1)
    """Lines of output kept per run; later ones are dropped (a note says so)."""

    max_log_bytes: int = Field(default=16 * 1024**2, ge=1)
    """Bytes of output kept per run (the lines' text); the line that would pass it and every later one
    are dropped (a note says so)."""

    keep_runs: int = Field(default=100, ge=1)
    """Runs kept per task, the latest: older ended ones are deleted with their output."""

    max_unpacked_bytes: int = Field(default=512 * 1024**2, ge=1)
    """Largest total size of an orchestration's files once extracted (the registry has its own limit)."""

    metrics_port: int | None = None
    """Port of the Prometheus endpoint; none when unset."""
