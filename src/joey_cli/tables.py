"""How commands print the SDK's listings and frames: wide, so a terminal's line holds a row."""

from __future__ import annotations

from typing import Any

import click


def wide_pandas() -> Any:
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 12, "display.max_colwidth", 60)


def echo_table(listing: Any, empty: str) -> None:
    """Print an SDK ``Listing`` as a table, or ``empty`` when it has no rows."""
    with wide_pandas():
        click.echo(listing.table() or empty)
