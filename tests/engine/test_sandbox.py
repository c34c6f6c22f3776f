"""Python step sandbox limits: user code that reads the engine's environment, allocates, spins, forks,
writes or leaves processes behind fails its call with a clear error (or is contained), and the runtime
goes on serving."""

from __future__ import annotations

import ast
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from joey_core.models import TensorSpec
from joey_engine import sandbox_user
from joey_engine.deployment import Step
from joey_engine.runtime import PythonRuntime, RuntimeAborted
from joey_engine.settings import EngineSettings
from tests.conftest import wait_until

SETTINGS = EngineSettings(
    instance_id="unit",
    python_step_timeout_s=20,
    sandbox_max_memory_mb=512,
    sandbox_max_cpu_s=2,
    sandbox_max_processes=16,
    sandbox_max_file_mb=1,
)

STEP = """
import os, sys, time
import numpy as np

def process_data(inputs):
    x = inputs["x"]
    if (x == 1).any():
{body}
    return {{"y": x * 2}}
"""

STEP_SIGNATURE = Step(
    "hostile",
    1,
    "0" * 64,
    "python",
    (TensorSpec("x", "float64", (-1,)),),
    (TensorSpec("y", "float64", (-1,)),),
)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[object]:
    runtimes: list[PythonRuntime] = []

    def load(body: str, settings: EngineSettings = SETTINGS) -> PythonRuntime:
        path = tmp_path / "step"
        indented = "\n".join("        " + line for line in body.strip().splitlines())
        path.write_text(STEP.format(body=indented))
        runtime = PythonRuntime(settings)
        runtime.load(path, STEP_SIGNATURE)
        runtimes.append(runtime)
        return runtime

    yield load
    for runtime in runtimes:
        runtime.close()


def still_serves(runtime: PythonRuntime) -> None:
    assert runtime.predict({"x": np.asarray([3.0])})["y"].tolist() == [6.0]


def test_no_joey_variable_reaches_user_code(hostile, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("JOEY_SERVICE_TOKEN", "joey_secret-canary")
    runtime = hostile("""
found = [k for k, v in os.environ.items() if k.startswith("JOEY_") or "canary" in v]
raise RuntimeError(f"seen {found} of {sorted(os.environ)}")
""")
    with pytest.raises(RuntimeError, match=r"^RuntimeError: seen \[\] of \[") as err:
        runtime.predict({"x": np.asarray([1.0])})
    assert "canary" not in str(err.value)
    still_serves(runtime)


def test_allocating_beyond_the_memory_limit_fails_the_call(hostile) -> None:  # type: ignore[no-untyped-def]
    runtime = hostile("hog = bytearray(1 << 30)")
    with pytest.raises(RuntimeError, match="^MemoryError"):
        runtime.predict({"x": np.asarray([1.0])})
    still_serves(runtime)


def test_spinning_past_the_cpu_limit_is_killed(hostile) -> None:  # type: ignore[no-untyped-def]
    runtime = hostile("while True:\n    pass")
    with pytest.raises(RuntimeAborted, match="killed by signal SIGXCPU"):
        runtime.predict({"x": np.asarray([1.0])})
    still_serves(runtime)


FORK_BOMB = """
read, write = os.pipe()
try:
    for _ in range(500):  # bounded: far past the limit, never past the machine
        if os.fork() == 0:
            os.read(read, 1)
            os._exit(0)
finally:
    os.close(write)
"""


def test_a_fork_bomb_runs_out_of_processes(hostile) -> None:  # type: ignore[no-untyped-def]
    runtime = hostile(FORK_BOMB)
    if os.geteuid() == 0:
        # The kernel exempts uid 0 from RLIMIT_NPROC whatever its capabilities: only a sandbox user
        # bounds a fork bomb (docs/security.md). The bounded one here ends with its pipe.
        assert runtime.predict({"x": np.asarray([1.0])})["y"].tolist() == [2.0]
    else:
        with pytest.raises(RuntimeError, match=r"^BlockingIOError: \[Errno 11\]"):
            runtime.predict({"x": np.asarray([1.0])})
    still_serves(runtime)


def test_writing_past_the_file_size_limit_fails_the_call(hostile, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runtime = hostile(f"""
with open({str(tmp_path / "huge")!r}, "wb") as out:
    out.write(bytes(4 << 20))
""")
    with pytest.raises(RuntimeError, match=r"^OSError: \[Errno 27\] File too large"):
        runtime.predict({"x": np.asarray([1.0])})
    assert (tmp_path / "huge").stat().st_size <= 1 << 20
    still_serves(runtime)


def test_a_grandchild_does_not_outlive_the_timeout(hostile, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pid_file = tmp_path / "grandchild"
    runtime = hostile(f"""
import subprocess
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(3600)
""")
    runtime._timeout = 3.0  # the CPU limit must not end it first: it sleeps
    with pytest.raises(RuntimeAborted, match="timed out after 3 s"):
        runtime.predict({"x": np.asarray([1.0])})
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not _alive(grandchild), 10, "the grandchild killed with its group")
    still_serves(runtime)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
    finally:
        os.sched_yield()


REPLICA = """
import ctypes, sys
from pathlib import Path
import numpy as np
from joey_engine.replica import PR_SET_DUMPABLE
from joey_engine.runtime import PythonRuntime
from joey_engine.settings import EngineSettings
from tests.engine.test_sandbox import STEP_SIGNATURE

ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # as a replica does
runtime = PythonRuntime(EngineSettings(instance_id="unit"))
runtime.load(Path(sys.argv[1]), STEP_SIGNATURE)
try:
    runtime.predict({"x": np.asarray([1.0])})
except RuntimeError as exc:
    print(exc)
runtime.close()
"""


def test_the_replicas_environment_is_not_readable_through_proc(tmp_path: Path) -> None:
    step = tmp_path / "step"
    step.write_text(
        STEP.format(
            body="        open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
            "        raise RuntimeError('read it')"
        )
    )
    env = os.environ | {"JOEY_SERVICE_TOKEN": "joey_canary"}
    replica = subprocess.run(
        [sys.executable, "-c", REPLICA, str(step)], env=env, capture_output=True, text=True, check=True
    )
    assert replica.stdout.startswith("PermissionError: [Errno 13] Permission denied: '/proc/")


NOT_ROOT = r"^JOEY_SANDBOX_USER 'nobody' is set but the engine does not run as root \(uid \d+\)"
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
"""Debian's python of the project's version, which any user may run (the project's may be under /root)."""


def _as_nobody(**settings: object) -> EngineSettings:
    return SETTINGS.model_copy(update={"sandbox_user": "nobody"} | settings)


@pytest.fixture
def world_venv() -> Iterator[Path]:
    """A venv of SYSTEM_PYTHON that ``nobody`` can run, without numpy yet (tmp_path is root's, 0700)."""
    assert SYSTEM_PYTHON.exists(), f"the sandbox user tests need {SYSTEM_PYTHON}"
    directory = Path(tempfile.mkdtemp(prefix="joey-test-sandbox-python-"))
    directory.chmod(0o755)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", directory], check=True)
    yield directory
    shutil.rmtree(directory)


def _with_numpy(venv: Path) -> Path:
    # A copy of the project venv's numpy (same python version and ABI): the project's venv may sit where
    # others cannot reach it (a checkout in a private directory), as its interpreter may.
    installed = Path(np.__file__).parents[1]
    site = venv / "lib" / SYSTEM_PYTHON.name / "site-packages"
    for package in ("numpy", "numpy.libs"):
        if (installed / package).is_dir():
            shutil.copytree(installed / package, site / package)
    return venv / "bin" / "python"


def test_an_unknown_sandbox_user_stops_the_engine_at_start() -> None:
    settings = SETTINGS.model_copy(update={"sandbox_user": "joey-no-such-user"})
    with pytest.raises(ValueError, match=r"^JOEY_SANDBOX_USER 'joey-no-such-user': no such user$"):
        sandbox_user.check(settings)


def test_a_sandbox_user_that_cannot_run_the_interpreter_stops_the_engine_at_start(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    (locked / "python").symlink_to(sys.executable)
    settings = _as_nobody(sandbox_python=locked / "python")
    if os.geteuid() == 0:
        expected = (
            rf"^JOEY_SANDBOX_USER 'nobody' cannot run python steps: cannot execute {locked}/python: "
            "Permission denied; set JOEY_SANDBOX_PYTHON"
        )
    else:
        expected = NOT_ROOT
    with pytest.raises(ValueError, match=expected):
        sandbox_user.check(settings)


def test_a_sandbox_user_whose_interpreter_lacks_numpy_stops_the_engine_at_start(world_venv: Path) -> None:
    settings = _as_nobody(sandbox_python=world_venv / "bin" / "python")
    if os.geteuid() == 0:
        expected = (
            r"^JOEY_SANDBOX_USER 'nobody' cannot run python steps: python step 'sandbox-user-probe' did not "
            r"start: process exited with code 1 \(its error is on the engine's stderr\)"
        )
    else:
        expected = NOT_ROOT
    with pytest.raises(ValueError, match=expected):
        sandbox_user.check(settings)


def test_python_steps_run_as_the_sandbox_user(hostile, world_venv: Path) -> None:  # type: ignore[no-untyped-def]
    settings = _as_nobody(sandbox_python=_with_numpy(world_venv))
    if os.geteuid() != 0:
        with pytest.raises(ValueError, match=NOT_ROOT):
            sandbox_user.check(settings)
        return
    sandbox_user.check(settings)
    # The step file is in root's tmp_path: the sandbox reads it from the descriptor the runtime opened.
    runtime = hostile(
        "who = (os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), os.environ['HOME'])\n"
        "raise RuntimeError(repr(who))",
        settings,
    )
    with pytest.raises(RuntimeError) as err:
        runtime.predict({"x": np.asarray([1.0])})
    nobody = pwd.getpwnam("nobody")
    seen = ast.literal_eval(str(err.value).removeprefix("RuntimeError: ").split(" (line ")[0])
    groups = os.getgrouplist("nobody", nobody.pw_gid)
    assert seen[:3] == (nobody.pw_uid, nobody.pw_uid, nobody.pw_gid)
    assert (sorted(seen[3]), seen[4]) == (sorted(groups), "/nonexistent")
    still_serves(runtime)


def test_a_sandbox_users_fork_bomb_runs_out_of_processes(hostile, world_venv: Path) -> None:  # type: ignore[no-untyped-def]
    settings = _as_nobody(sandbox_python=_with_numpy(world_venv))
    if os.geteuid() != 0:
        with pytest.raises(ValueError, match=NOT_ROOT):
            sandbox_user.check(settings)
        return
    runtime = hostile(FORK_BOMB, settings)
    with pytest.raises(RuntimeError, match=r"^BlockingIOError: \[Errno 11\]"):
        runtime.predict({"x": np.asarray([1.0])})
    still_serves(runtime)


def test_a_root_engine_without_a_sandbox_user_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="joey_engine.sandbox_user"):
        sandbox_user.check(SETTINGS)
    warnings = [r.getMessage() for r in caplog.records if r.name == "joey_engine.sandbox_user"]
    if os.geteuid() == 0:
        assert len(warnings) == 1
        assert "python steps run as root, without capabilities; set JOEY_SANDBOX_USER" in warnings[0]
    else:
        assert warnings == []
