"""Joey: Kafka-native MLOps. ``joey.Client`` is the entry point of the Python SDK.

The public API is what this package and :mod:`joey.client` export; :mod:`joey.assays` scores drift
offline and :mod:`joey_cli` is the ``joey`` command. Services never import this package (they share
:mod:`joey_core`), so loading the SDK here costs them nothing.
"""

from joey.client import (
    Assay,
    AssayBuilder,
    Autoscale,
    Client,
    DeploymentStatus,
    InferenceTimeout,
    JoeyError,
    ModelVersion,
    Pipeline,
    TensorSpec,
    User,
    Workspace,
    task_args,
)
from joey_core import __version__

__all__ = [
    "Assay",
    "AssayBuilder",
    "Autoscale",
    "Client",
    "DeploymentStatus",
    "InferenceTimeout",
    "JoeyError",
    "ModelVersion",
    "Pipeline",
    "TensorSpec",
    "User",
    "Workspace",
    "__version__",
    "task_args",
]
