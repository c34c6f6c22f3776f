"""Joey: Kafka-native MLOps. ``joey.Client`` is the entry point of the Python SDK."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "__version__"]

if TYPE_CHECKING:
    from joey.sdk import Client


def __getattr__(name: str) -> Any:
    # Lazy so that services importing joey.settings do not pay for the SDK's imports.
    if name == "Client":
        from joey.sdk import Client

        return Client
    raise AttributeError(name)
