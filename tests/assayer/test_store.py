"""The assayer's store: which assays it scores."""

from __future__ import annotations

import secrets
from dataclasses import replace

import psycopg

from joey_assayer.store import AssayerStore
from tests.joey_core.assays.test_panes import create_assay, definition


def test_an_unreadable_definition_fails_its_assay_alone(database_url: str) -> None:
    pipeline = f"p-{secrets.token_hex(3)}"
    good = definition(name=f"g-{secrets.token_hex(3)}", pipeline=pipeline)
    with psycopg.connect(database_url) as conn:
        good_id = create_assay(conn, good)
        # Written around the registry's checks (or by another version): from_json cannot read it.
        bad_id = create_assay(conn, replace(good, name=f"u-{secrets.token_hex(3)}"))
        conn.execute("UPDATE assays SET definition = definition - 'summarizer' WHERE id = %s", (bad_id,))
        conn.commit()
    store = AssayerStore(database_url)
    try:
        live = [a.id for a in store.active_assays()]
        assert good_id in live and bad_id not in live
        assert bad_id not in [a.id for a in store.active_assays()]  # failed: not read again
    finally:
        store.close()
    with psycopg.connect(database_url) as conn:
        rows = dict(
            conn.execute("SELECT id, failure FROM assays WHERE id = ANY(%s)", ([good_id, bad_id],)).fetchall()
        )
    assert rows[good_id] is None
    with psycopg.connect(database_url) as conn:  # paused: no later assayer spends its ticks on it
        conn.execute("UPDATE assays SET active = false WHERE id = %s", (good_id,))
    assert "its definition cannot be read: KeyError" in rows[bad_id] and "summarizer" in rows[bad_id]
