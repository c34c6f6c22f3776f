"""The fuzz budget of `make test`, and how to spend more locally.

By default every property runs a fixed, derandomized set of examples: the same inputs on every run, so
a red `make test` is reproducible from the commit alone and never flakes on a lucky draw, and all fuzz
targets together stay well under a minute on a loaded two-core machine. JOEY_FUZZ_EXAMPLES=<n> runs n
random examples per property instead (new inputs each run; a failure prints the blob that reproduces it).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_LONGER = os.environ.get("JOEY_FUZZ_EXAMPLES")

settings.register_profile(
    "fuzz",
    # Wall-clock deadlines fail properties on busy machines without a bug: the contract is checked, not speed.
    deadline=None,
    max_examples=int(_LONGER) if _LONGER else 150,
    derandomize=not _LONGER,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("fuzz")
