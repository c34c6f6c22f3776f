"""Deprecated home of the SDK, kept so code written against ``joey.sdk`` keeps working.

The SDK moved to :mod:`joey.client`; ``import joey`` gives its main names. This module re-exports
:mod:`joey.client` unchanged and warns once on import.
"""

import warnings

from joey.client import *  # noqa: F403  # the same public API as joey.client, nothing more
from joey.client import __all__ as __all__

warnings.warn(
    "joey.sdk is deprecated: import from joey (joey.Client, joey.Pipeline, ...) or joey.client",
    DeprecationWarning,
    stacklevel=2,
)
