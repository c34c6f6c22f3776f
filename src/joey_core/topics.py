"""Topic names: the only place that knows how topics are spelled."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEPLOYMENTS = "joey.deployments"
"""Compacted; key ``<workspace>/<pipeline>``, value a JSON DeploymentSpec, tombstone = undeployed."""

BRIDGES = "joey.bridges"
"""Compacted; key ``<workspace>/<bridge>``, value a JSON BridgeSpec (joey_core.bridges); tombstone:
deleted."""

LOGS = "joey.logs"
"""One Avro InferenceLog per inference (success or failure)."""

LOGS_DEAD_LETTER = "joey.logs.dead-letter"
"""Log records the logger could not decode, kept verbatim for inspection."""

ASSAY_RESULTS = "joey.assays.results"
"""One JSON record per scored assay window; key ``<workspace>/<assay>/<window start>``."""

ASSAY_ALERTS = "joey.assays.alerts"
"""The results of ASSAY_RESULTS whose status is Warning or Alert."""

NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 63


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid workspace/pipeline/model name, else raise ValueError."""
    if not name or len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {MAX_NAME_LENGTH} characters"
        )
    return name


@dataclass(frozen=True)
class PipelineTopics:
    inputs: str
    outputs: str
    errors: str

    def all(self) -> tuple[str, str, str]:
        return (self.inputs, self.outputs, self.errors)


def pipeline_topics(workspace: str, pipeline: str) -> PipelineTopics:
    base = f"joey.{workspace}.{pipeline}"
    return PipelineTopics(inputs=f"{base}.inputs", outputs=f"{base}.outputs", errors=f"{base}.errors")


def deployment_key(workspace: str, pipeline: str) -> str:
    return f"{workspace}/{pipeline}"


def engine_group(workspace: str, pipeline: str) -> str:
    """Consumer group of a pipeline's engine replicas (stable across versions, so offsets carry over)."""
    return f"joey.engine.{workspace}.{pipeline}"


def attempt_notes_key(prefix: str, group: str) -> str:
    """Redis hash where an engine group's replicas note the records they are processing (the engine's
    attempts module); the registry deletes it with the pipeline, so a new one does not inherit notes."""
    return f"{prefix}:attempts:{group}"


LOGGER_GROUP = "joey.logger"

ASSAYER_GROUP = "joey.assayer"
