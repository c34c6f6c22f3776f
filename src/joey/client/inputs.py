"""The SDK's side of :mod:`joey_core.inputs`: the deployed version's record inputs asked of the registry, and
data refused as a :class:`JoeyError` (INVALID_ARGUMENT) as every other refusal of the SDK is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from joey.client.calls import JoeyError, RegistryCaller
from joey_core import inputs
from joey_core.inputs import RecordInput, Signature, record_inputs
from joey_core.lazy import LazyModule
from joey_core.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")

__all__ = ["InputError", "RecordInput", "deployed_inputs", "to_records"]


class InputError(JoeyError, inputs.InputError):
    """Data ``Pipeline.infer`` refuses before sending anything: it does not fit the pipeline's inputs."""

    def __init__(self, message: str) -> None:
        super().__init__("INVALID_ARGUMENT", message)


def deployed_inputs(client: RegistryCaller, pipeline: str, version: int) -> tuple[RecordInput, ...]:
    """The record inputs of ``version`` of ``pipeline``; none when it has no model step."""
    found = client.call("GetPipeline", pb.GetPipelineRequest(workspace=client.workspace, name=pipeline))
    for pv in found.versions:
        if pv.version == version:
            return record_inputs(pv)
    return ()


def to_records(
    data: pa.Table | pd.DataFrame | np.ndarray | Sequence[dict[str, Any]] | dict[str, Any],
    signature: Signature,
    pipeline: str,
) -> list[Any]:
    """One input record per row of ``data`` (:func:`joey_core.inputs.to_records`); raise InputError when it
    cannot fit the pipeline's inputs."""
    try:
        return inputs.to_records(data, signature, pipeline)
    except inputs.InputError as exc:
        raise InputError(str(exc)) from None
