"""The layout's promises that import contracts cannot see: what a process actually loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVICES = ("registry", "engine", "logger", "assayer", "gateway", "connector_bridge", "orchestrator")


def loaded(module: str) -> set[str]:
    """Top-level packages of Joey a fresh interpreter has loaded after importing ``module``."""
    probe = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return {name for name in out.split() if name == "joey" or name.startswith("joey_")}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_process_loads_neither_the_sdk_nor_another_service(service: str) -> None:
    # `joey serve <name>` execs `python -m joey_<name>`, which runs joey_<name>.app: the SDK (pandas,
    # pyarrow: ~100 MB per process) must not come along, nor must another service's code.
    assert loaded(f"joey_{service}.app") == {"joey_core", f"joey_{service}"}


def test_the_cli_loads_the_sdk_only_for_the_commands_that_use_it() -> None:
    # `joey --help`, `joey up`'s supervisor and `joey serve` (before its exec) stay light.
    assert loaded("joey_cli") == {"joey_cli"}
    assert loaded("joey_cli.stack") == {"joey_cli", "joey_core"}


def test_the_documented_imports_work() -> None:
    import joey
    import joey_core.assays
    from joey.assays import score

    assert joey.Client.__module__ == "joey.client.client"
    assert joey.Autoscale.__module__ == "joey.client.pipelines"
    assert joey.__version__ == joey_core.__version__
    assert score is joey_core.assays.score


def test_code_written_against_joey_sdk_still_works_and_is_told_where_the_sdk_went() -> None:
    import joey.client

    with pytest.warns(DeprecationWarning, match="joey.sdk is deprecated"):
        sys.modules.pop("joey.sdk", None)
        import joey.sdk

    assert joey.sdk.__all__ == joey.client.__all__
    assert all(getattr(joey.sdk, name) is getattr(joey.client, name) for name in joey.client.__all__)


def test_dir_and_tab_completion_show_the_public_api() -> None:
    import joey

    # IPython and the REPL complete from dir(): every exported name must be there, eagerly.
    assert {"Client", "Pipeline", "Autoscale", "JoeyError"} <= set(dir(joey))
    assert set(joey.__all__) <= set(dir(joey))


def test_the_registry_imports_no_framework_it_converts() -> None:
    # Native models are loaded and converted in a confined child (joey_registry.convert_process): the
    # registry itself must not even import their frameworks, whose import runs their code.
    frameworks = ("sklearn", "skl2onnx", "xgboost", "lightgbm", "onnxmltools", "torch", "onnxscript")
    probe = "import sys, joey_registry.app; print(' '.join(m.split('.')[0] for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert not set(out.split()) & set(frameworks)
