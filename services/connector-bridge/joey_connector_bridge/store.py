"""The connector-bridge's Postgres (Joey's own database): bridges' status for the registry to show,
sources' positions, and the leases that let one process at a time run a source.

``rows_moved`` is exact: a source adds a batch's rows in the transaction that checkpoints its
position, so a batch sent again after a crash (its position not saved) is counted once; a sink adds
the rows of offsets it had not counted yet (marks per partition, in ``bridge_positions``), so a
replayed batch adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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

    def report(self, bridge_id: int, state: str, lag: int, error: str, instance: str) -> None:
        """Set the bridge's state; a deleted bridge has no row to set."""
        try:
            with self._pool.connection() as conn:
                conn.execute(
                    "INSERT INTO bridge_status (bridge_id, state, lag, last_error, instance) "
                    "SELECT id, %(state)s, %(lag)s, %(error)s, %(instance)s FROM bridges "
                    "WHERE id = %(id)s ON CONFLICT (bridge_id) DO UPDATE SET state = EXCLUDED.state, "
                    "lag = EXCLUDED.lag, last_error = EXCLUDED.last_error, instance = EXCLUDED.instance, "
                    "updated_at = now()",
                    {"id": bridge_id, "state": state, "lag": lag, "error": error, "instance": instance},
                )
        except psycopg.Error as exc:
            # Status is advisory: the bridge's work goes on without it.
            log.warning("could not record the status of bridge %d: %s", bridge_id, exc)

    def position(self, bridge_id: int) -> Any:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT position FROM bridge_positions WHERE bridge_id = %s", (bridge_id,)
            ).fetchone()
        return row[0].get("after") if row else None

    def save_position(self, bridge_id: int, after: Any, moved: int) -> None:
        """Checkpoint a source at ``after`` and count the ``moved`` rows that got it there, at once."""
        with self._pool.connection() as conn, conn.transaction():
            self._set_position(conn, bridge_id, {"after": after})
            _add_moved(conn, bridge_id, moved)

    def count(self, bridge_id: int, offsets: Mapping[str, Sequence[int]]) -> int:
        """Count a sink's rows durable at ``offsets`` (per partition) that were not counted before;
        how many were new."""
        if not offsets:
            return 0
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO bridge_positions (bridge_id, position) SELECT id, '{}' FROM bridges "
                "WHERE id = %s ON CONFLICT (bridge_id) DO NOTHING",
                (bridge_id,),
            )
            row = conn.execute(
                "SELECT position FROM bridge_positions WHERE bridge_id = %s FOR UPDATE", (bridge_id,)
            ).fetchone()
            if row is None:
                return 0  # the bridge was deleted
            marks: dict[str, int] = dict(row[0].get("counted", {}))
            new = 0
            for partition, found in offsets.items():
                mark = marks.get(partition, -1)
                new += sum(1 for offset in found if offset > mark)
                marks[partition] = max([mark, *found])
            self._set_position(conn, bridge_id, {"counted": marks})
            _add_moved(conn, bridge_id, new)
        return new

    @staticmethod
    def _set_position(conn: psycopg.Connection[Any], bridge_id: int, position: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO bridge_positions (bridge_id, position) SELECT id, %(p)s FROM bridges "
            "WHERE id = %(id)s ON CONFLICT (bridge_id) DO UPDATE SET position = EXCLUDED.position, "
            "updated_at = now()",
            {"id": bridge_id, "p": Jsonb(position)},
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


def _add_moved(conn: psycopg.Connection[Any], bridge_id: int, moved: int) -> None:
    conn.execute(
        "INSERT INTO bridge_status (bridge_id, state, rows_moved) SELECT id, 'running', %(moved)s "
        "FROM bridges WHERE id = %(id)s ON CONFLICT (bridge_id) DO UPDATE "
        "SET rows_moved = bridge_status.rows_moved + EXCLUDED.rows_moved",
        {"id": bridge_id, "moved": moved},
    )
