"""The connector-bridge's Postgres (Joey's own database): bridges' status for the registry to show,
sources' positions, and the leases that let one process at a time run a source."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

SOURCE_LOCKS = 0x6A6F6579
"""The first key of the advisory locks leasing sources (the second is the bridge's id): 'joey'."""


class BridgeStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )

    def open(self) -> None:
        self._pool.open(wait=True, timeout=30)

    def close(self) -> None:
        self._pool.close()

    def report(self, bridge_id: int, state: str, moved: int, lag: int, error: str, instance: str) -> None:
        """Add ``moved`` rows to the bridge's count and set the rest; a deleted bridge has no row to set."""
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    "INSERT INTO bridge_status (bridge_id, state, rows_moved, lag, last_error, instance) "
                    "SELECT id, %(state)s, %(moved)s, %(lag)s, %(error)s, %(instance)s FROM bridges "
                    "WHERE id = %(id)s ON CONFLICT (bridge_id) DO UPDATE SET state = EXCLUDED.state, "
                    "rows_moved = bridge_status.rows_moved + EXCLUDED.rows_moved, lag = EXCLUDED.lag, "
                    "last_error = EXCLUDED.last_error, instance = EXCLUDED.instance, updated_at = now()",
                    {
                        "id": bridge_id,
                        "state": state,
                        "moved": moved,
                        "lag": lag,
                        "error": error,
                        "instance": instance,
                    },
                )
        except psycopg.Error as exc:
            # Status is advisory: the bridge's work goes on without it.
            log.warning("could not record the status of bridge %d: %s", bridge_id, exc)

    def position(self, bridge_id: int) -> Any:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT position FROM bridge_positions WHERE bridge_id = %s", (bridge_id,)
            ).fetchone()
        return row[0]["after"] if row else None

    def save_position(self, bridge_id: int, after: Any) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO bridge_positions (bridge_id, position) SELECT id, %(p)s FROM bridges "
                "WHERE id = %(id)s ON CONFLICT (bridge_id) DO UPDATE SET position = EXCLUDED.position, "
                "updated_at = now()",
                {"id": bridge_id, "p": Jsonb({"after": after})},
            )

    def lease(self, bridge_id: int) -> psycopg.Connection[Any] | None:
        """A connection holding source ``bridge_id``'s lease, or None when another process holds it. The
        lease is the session's advisory lock: it ends with the connection, so with its process, even a
        killed one (the server sees the socket close)."""
        conn = psycopg.connect(self._url, autocommit=True)
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s::int4, %s::int4)", (SOURCE_LOCKS, bridge_id % 2**31)
        ).fetchone()
        if row and row[0]:
            return conn
        conn.close()
        return None
