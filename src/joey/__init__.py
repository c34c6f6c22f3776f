"""Joey: Kafka-native MLOps. ``joey.Client`` is the entry point of the Python SDK."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Autoscale", "Client", "__version__"]

if TYPE_CHECKING:
    from joey.sdk import Autoscale, Client


def __getattr__(name: str) -> Any:
    # Lazy so that services importing joey.settings do not pay for the SDK's imports.
    if name in __all__:
        from joey import sdk

        return getattr(sdk, name)
    raise AttributeError(name)
