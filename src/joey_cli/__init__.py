"""The ``joey`` command: the local stack (``joey up``), the services (``joey serve``) and the SDK's
verbs (``joey model``, ``joey pipeline``, ``joey assay``, ...).

A package of its own, beside :mod:`joey` rather than in it: a command imports the SDK only when it
runs, so ``joey --help``, ``joey up``'s long-lived supervisor and ``joey serve`` never load it (pandas
and pyarrow: about a second and 130 MB).
"""

from joey_cli.commands import main

__all__ = ["main"]
