"""The child process an upload is checked in: its limits, and what it can see of the registry."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from joey_core.models import TensorSpec
from joey_registry.errors import InvalidArgument
from joey_registry.model_check import ModelCheck
from joey_registry.validation import Signature
from tests.conftest import wait_until
from tests.registry.helpers import heavy_step

SPECS = (TensorSpec(name="x", dtype="float32", shape=(-1,)),)


def heavy_step_file(tmp_path: Path) -> Path:
    path = tmp_path / "step.py"
    path.write_bytes(heavy_step())
    return path


def refusal(check: ModelCheck, path: Path, framework: str = "python") -> str:
    with pytest.raises(InvalidArgument) as info:
        check.inspect(framework, path, Signature(SPECS, SPECS))
    return str(info.value)


def test_a_check_over_its_memory_is_refused(tmp_path: Path) -> None:
    # About 210 MiB hold the interpreter and onnxruntime; the syntax tree needs far more than the rest.
    message = refusal(ModelCheck(memory_mb=300, cpu_s=60, timeout_s=60), heavy_step_file(tmp_path))
    assert message == (
        "checking the model needed more than 300 MiB of memory (JOEY_UPLOAD_CHECK_MEMORY_MB); "
        "nothing was stored"
    )


def test_a_check_over_its_cpu_is_refused(tmp_path: Path) -> None:
    message = refusal(ModelCheck(memory_mb=8192, cpu_s=1, timeout_s=60), heavy_step_file(tmp_path))
    assert (
        message
        == "checking the model used more than 1 s of CPU (JOEY_UPLOAD_CHECK_CPU_S); nothing was stored"
    )


def test_the_check_reads_the_signature(iris_model: Path) -> None:
    signature = ModelCheck(memory_mb=4096, cpu_s=60, timeout_s=60).inspect(
        "onnx", iris_model, Signature((), ())
    )
    assert [(s.name, s.dtype, s.shape) for s in signature.inputs] == [("features", "float32", (-1, 4))]


def _checking_pids() -> list[int]:
    """The check processes of this test process at work on a request: each is started ahead of its upload
    and waits for it unconfined, so the one checking is the one whose OOM score it raised."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            if (
                entry.name.isdigit()
                and b"joey_registry.check_process" in Path(entry.path, "cmdline").read_bytes()
                and Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())
                and Path(entry.path, "oom_score_adj").read_text().strip() == "1000"
            ):
                found.append(int(entry.name))
        except OSError:
            pass  # ended meanwhile
    return found


def test_the_checking_process_sees_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_aside: Callable[[Callable[[], object]], None]
) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("JOEY_SERVICE_TOKEN", secret)
    monkeypatch.setenv("JOEY_DATABASE_URL", f"postgresql://joey:{secret}@127.0.0.1/joey")
    path = heavy_step_file(tmp_path)
    run_aside(lambda: refusal(ModelCheck(memory_mb=8192, cpu_s=2, timeout_s=60), path))
    # Found by the OOM score it raised: it yields to the registry in the OOM killer's choice.
    pids = wait_until(_checking_pids, 30, "the checking process to take the upload")
    environment = Path(f"/proc/{pids[0]}/environ").read_bytes()  # type: ignore[index]
    assert environment  # it has one (PATH, the locale)
    assert b"JOEY_" not in environment and secret.encode() not in environment
    # And the CPU.
    assert os.getpriority(os.PRIO_PROCESS, pids[0]) >= 10  # type: ignore[index]


def test_the_checking_process_imports_from_the_registrys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_aside: Callable[[Callable[[], object]], None]
) -> None:
    # A registry run from a checkout (PYTHONPATH) checks with that checkout's code, not the installed one.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.syspath_prepend(str(checkout))
    path = heavy_step_file(tmp_path)
    run_aside(lambda: refusal(ModelCheck(memory_mb=8192, cpu_s=2, timeout_s=60), path))
    pids = wait_until(_checking_pids, 30, "the checking process to take the upload")
    environment = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")  # type: ignore[index]
    python_path = next(v for v in environment if v.startswith(b"PYTHONPATH="))
    assert str(checkout).encode() in python_path.removeprefix(b"PYTHONPATH=").split(b":")


@pytest.fixture
def run_aside() -> Callable[[Callable[[], object]], None]:
    threads: list[threading.Thread] = []

    def run(work: Callable[[], object]) -> None:
        thread = threading.Thread(target=work)
        thread.start()
        threads.append(thread)

    yield run  # type: ignore[misc]
    for thread in threads:
        thread.join()
