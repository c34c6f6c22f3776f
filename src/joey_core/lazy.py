"""A module imported on first use. pandas alone costs half a second to import; every `joey` command
and every service imports the SDK's or core's modules that mention it, and most never touch a frame."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name`` and imports it at the first attribute looked up. Unlike
    importlib.util.LazyLoader it leaves sys.modules alone, so other libraries probing for the module
    (pyarrow probes for pandas) see it only once it is really imported."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)
