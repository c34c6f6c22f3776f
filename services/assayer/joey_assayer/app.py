"""Entry point of `joey serve assayer`."""

from __future__ import annotations

from joey_assayer.service import Assayer
from joey_assayer.settings import AssayerSettings
from joey_assayer.store import AssayerStore
from joey_core.lifecycle import configure_logging, harden_process, shutdown_event


def serve() -> None:
    harden_process()
    settings = AssayerSettings()
    configure_logging(settings)
    stop = shutdown_event()
    store = AssayerStore(settings.database_url.get_secret_value())
    try:
        Assayer(settings, store).run(stop)
    finally:
        store.close()
