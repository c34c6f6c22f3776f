"""Drift scoring offline, with Wallaroo's assay semantics: ``from joey.assays import score``.

The same math scores live assays in the services; it lives in :mod:`joey_core.assays`, whose
documentation states the binning and metric rules. This module is its public face: it exports exactly
what that package exports.
"""

from joey_core.assays import *  # noqa: F403  # the public API is joey_core.assays.__all__, nothing else
from joey_core.assays import __all__ as __all__
