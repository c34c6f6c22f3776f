"""Tags of models and pipelines, as the SDK sets them."""

from __future__ import annotations

from joey.client.calls import RegistryCaller
from joey_core.v1 import registry_pb2 as pb


def set_tag(
    client: RegistryCaller, workspace: str, kind: str, name: str, tag: str, add: bool
) -> tuple[str, ...]:
    """Add (or remove) ``tag`` of the model or pipeline (``kind``) ``name``; its tags after, sorted."""
    request = pb.TagRequest(workspace=workspace, tag=tag, **{kind: name})  # type: ignore[arg-type]
    return tuple(client.call("AddTag" if add else "RemoveTag", request).tags)
