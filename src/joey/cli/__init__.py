"""The ``joey`` command: the local stack (``joey up``), the services (``joey serve``) and the SDK's
verbs (``joey model``, ``joey pipeline``, ``joey assay``, ...)."""

from joey.cli.commands import main

__all__ = ["main"]
