"""The engine's start-up check of the user python steps run as (``JOEY_SANDBOX_USER``, docs/security.md)."""

from __future__ import annotations

import logging
import os
import pwd
import tempfile
from pathlib import Path

from joey_core.models import TensorSpec
from joey_engine.deployment import Step
from joey_engine.runtime import PythonRuntime, RuntimeAborted
from joey_engine.settings import EngineSettings

log = logging.getLogger(__name__)

_PROBE = "import numpy\n\n\ndef process_data(inputs):\n    return inputs\n"
_PROBE_TENSORS = (TensorSpec("x", "float64", (-1,)),)
_PROBE_STEP = Step("sandbox-user-probe", 1, "0" * 64, "python", _PROBE_TENSORS, _PROBE_TENSORS)


def check(settings: EngineSettings) -> None:
    """Raise ValueError, naming the user and what failed, when python steps cannot run as the sandbox
    user: found out once at start rather than by every python step failing later."""
    user = settings.sandbox_user
    if user is None:
        if os.geteuid() == 0:
            log.warning(
                "the engine runs as root and JOEY_SANDBOX_USER is unset: python steps run as root, "
                "without capabilities; set JOEY_SANDBOX_USER to an unprivileged user that can run "
                "JOEY_SANDBOX_PYTHON (docs/security.md)"
            )
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"JOEY_SANDBOX_USER {user!r}: no such user") from None
    if os.geteuid() != 0:
        raise ValueError(
            f"JOEY_SANDBOX_USER {user!r} is set but the engine does not run as root (uid {os.geteuid()}), "
            "so it cannot switch python steps to another user; unset it"
        )
    with tempfile.TemporaryDirectory(prefix="joey-sandbox-probe-") as directory:
        path = Path(directory) / "probe.py"
        path.write_text(_PROBE)
        runtime = PythonRuntime(settings)
        try:
            runtime.load(path, _PROBE_STEP)
        except OSError as exc:
            failed = f"cannot execute {exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            raise ValueError(
                f"JOEY_SANDBOX_USER {user!r} cannot run python steps: {failed}; "
                "set JOEY_SANDBOX_PYTHON to an interpreter with numpy that it can run"
            ) from None
        except RuntimeAborted as exc:
            raise ValueError(
                f"JOEY_SANDBOX_USER {user!r} cannot run python steps: {exc} (its error is on the engine's "
                "stderr); JOEY_SANDBOX_PYTHON must be an interpreter with numpy that it can run"
            ) from None
        finally:
            runtime.close()
