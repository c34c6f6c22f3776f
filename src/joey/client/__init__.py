"""The Python SDK: what ``import joey`` gives a user. Verbs follow what Wallaroo users know.

:class:`Client` talks to the registry over gRPC and hands out pipelines, models and assays; inference
goes straight to the pipeline's Kafka topics. Everything here is client-side: the services never
import this package.
"""

from joey.client.assays import Assay, AssayBuilder, AssayResult, AssayResults, AssaySummary
from joey.client.bridges import Bridge, BridgeStatus
from joey.client.calls import JoeyError
from joey.client.catalog import (
    DeletedModel,
    DeletedPipeline,
    Listing,
    ModelDescription,
    ModelSummary,
    ModelUse,
    PipelineSummary,
)
from joey.client.client import Client
from joey.client.connections import Connection, ConnectionTest
from joey.client.identity import AuditEntry, TokenInfo, User
from joey.client.models import ModelVersion
from joey.client.orchestrations import Orchestration, PackagingStatus, Task, TaskRun, task_args
from joey.client.pipelines import (
    Autoscale,
    DeploymentStatus,
    KeySplitStep,
    ModelStep,
    Pipeline,
    PipelineDescription,
    PipelineStep,
    PipelineVersion,
    RandomSplitStep,
    ReplicaStatus,
    ShadowStep,
    ValidationsStep,
)
from joey.client.streaming import InferenceTimeout
from joey.client.workspaces import Member, Workspace
from joey_core.models import ArtifactFile, TensorSpec

__all__ = [
    "ArtifactFile",
    "Assay",
    "AssayBuilder",
    "AssayResult",
    "AssayResults",
    "AssaySummary",
    "AuditEntry",
    "Autoscale",
    "Bridge",
    "BridgeStatus",
    "Client",
    "Connection",
    "ConnectionTest",
    "DeletedModel",
    "DeletedPipeline",
    "DeploymentStatus",
    "InferenceTimeout",
    "JoeyError",
    "KeySplitStep",
    "Listing",
    "Member",
    "ModelDescription",
    "ModelStep",
    "ModelSummary",
    "ModelUse",
    "ModelVersion",
    "Orchestration",
    "PackagingStatus",
    "Pipeline",
    "PipelineDescription",
    "PipelineStep",
    "PipelineSummary",
    "PipelineVersion",
    "RandomSplitStep",
    "ReplicaStatus",
    "ShadowStep",
    "Task",
    "TaskRun",
    "TensorSpec",
    "TokenInfo",
    "User",
    "ValidationsStep",
    "Workspace",
    "task_args",
]
