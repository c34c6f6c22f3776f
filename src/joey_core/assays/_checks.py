"""Argument checks shared by the assay modules; each error names the argument and the value."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def check_num_bins(num_bins: object) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer):
        raise ValueError(f"num_bins must be an integer, got {num_bins!r}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")


def check_min_count(min_count: object) -> None:
    if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer):
        raise ValueError(f"min_count must be an integer, got {min_count!r}")
    if min_count < 0:
        raise ValueError(f"min_count must be 0 or more (0 judges every window with a value), got {min_count}")
