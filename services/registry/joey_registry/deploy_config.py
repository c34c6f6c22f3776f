"""Checks of a deployment's configuration: autoscaling bounds and resource hints."""

from __future__ import annotations

import math
import re

from joey_registry.domain import Autoscale, Resources
from joey_registry.errors import InvalidArgument

# Kubernetes quantities: CPUs as cores ("2", "0.5") or millicores ("500m"); memory in bytes with an
# optional decimal or binary suffix ("512Mi", "2Gi", "1G").
_CPUS = re.compile(r"(\d+(\.\d+)?|\d+m)")
_MEMORY = re.compile(r"\d+(\.\d+)?(k|M|G|T|Ki|Mi|Gi|Ti)?")


def check_autoscale(config: Autoscale, partitions: int) -> None:
    if not 1 <= config.min_replicas <= config.max_replicas:
        raise InvalidArgument(
            f"autoscaling needs 1 <= min_replicas <= max_replicas, got min {config.min_replicas} and "
            f"max {config.max_replicas} (scaling from zero is not supported: the signal comes from "
            "running replicas)"
        )
    if config.max_replicas > partitions:
        raise InvalidArgument(
            f"autoscaling max_replicas ({config.max_replicas}) exceeds the {partitions} partitions of "
            "each pipeline topic (JOEY_PIPELINE_PARTITIONS); a replica beyond that would hold none"
        )
    for name in ("queue_age_threshold_s", "scale_up_after_s", "scale_down_after_s"):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise InvalidArgument(f"autoscaling {name} must be a positive number of seconds, got {value}")


def check_resources(resources: Resources | None) -> None:
    if resources is None:
        return
    if resources.cpus and not _CPUS.fullmatch(resources.cpus):
        raise InvalidArgument(
            f'cpus {resources.cpus!r} is not a CPU quantity: use cores ("2", "0.5") or millicores ("500m")'
        )
    if resources.memory and not _MEMORY.fullmatch(resources.memory):
        raise InvalidArgument(
            f"memory {resources.memory!r} is not a memory quantity: use bytes with an optional suffix "
            '("512Mi", "2Gi", "1G")'
        )
    for name, quantity in (("cpus", resources.cpus), ("memory", resources.memory)):
        if quantity and not _positive(quantity):
            raise InvalidArgument(
                f"{name} must be more than zero, got {quantity!r}; leave it out for no hint"
            )


def _positive(quantity: str) -> bool:
    """Whether a quantity that matched its pattern is more than zero ("0", "0m" and "0Gi" are not)."""
    return float(re.sub(r"[A-Za-z]+$", "", quantity)) > 0
