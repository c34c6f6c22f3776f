"""Protobuf <-> domain conversions; the only module besides the servicer that knows the wire types."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from joey_core.models import ArtifactFile, ModelConfig, specs_from_proto
from joey_core.topics import PipelineTopics
from joey_core.v1 import registry_pb2 as pb
from joey_registry import domain
from joey_registry.errors import InvalidArgument

_VALIDITY = {
    pb.LOG_VALIDITY_ALL: domain.LogValidity.ALL,
    pb.LOG_VALIDITY_OK: domain.LogValidity.OK,
    pb.LOG_VALIDITY_FAILED: domain.LogValidity.FAILED,
}


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def optional_datetime(message: pb.QueryLogsRequest, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    ts: Timestamp = getattr(message, field)
    return ts.ToDatetime(tzinfo=UTC)


def workspace(ws: domain.Workspace) -> pb.Workspace:
    return pb.Workspace(name=ws.name, created_at=timestamp(ws.created_at), role=ws.role)


def model(m: domain.Model) -> pb.Model:
    return pb.Model(
        workspace=m.workspace, name=m.name, versions=[v.to_proto() for v in m.versions], tags=m.tags
    )


def model_description(d: domain.ModelDescription) -> pb.ModelDescription:
    uses = [
        pb.ModelVersionUse(
            model_version=u.model_version,
            pipeline=u.pipeline,
            pipeline_version=u.pipeline_version,
            deployed=u.deployed,
        )
        for u in d.uses
    ]
    return pb.ModelDescription(model=model(d.model), uses=uses)


def upload_header(header: pb.UploadModelHeader) -> domain.UploadHeader:
    return domain.UploadHeader(
        workspace=header.workspace,
        name=header.name,
        framework=header.framework,
        inputs=specs_from_proto(header.inputs),
        outputs=specs_from_proto(header.outputs),
        sample_input=_sample_input(header.sample_input_json),
        description=header.description,
        source=header.source,
        metadata_json=header.metadata_json,
        artifacts=tuple(ArtifactFile.from_proto(f) for f in header.artifacts),
    )


def model_search(request: pb.SearchModelsRequest) -> domain.ModelSearch:
    return domain.ModelSearch(
        search_term=request.search_term or None,
        tag=request.tag or None,
        framework=request.framework or None,
        uploaded_after=optional_datetime(request, "uploaded_after"),  # type: ignore[arg-type]
    )


def pipeline_search(request: pb.SearchPipelinesRequest) -> domain.PipelineSearch:
    return domain.PipelineSearch(search_term=request.search_term or None, tag=request.tag or None)


_MAX_SAMPLE_JSON = 1 << 20


def _sample_input(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    if len(text) > _MAX_SAMPLE_JSON:
        raise InvalidArgument(
            f"the sample input is {len(text)} characters of JSON; at most {_MAX_SAMPLE_JSON}"
        )
    try:
        sample = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"the sample input is not JSON: {exc}") from None
    if not isinstance(sample, dict) or not sample:
        raise InvalidArgument("the sample input must be a JSON object {input name: [row, ...]}")
    return sample


def step_requests(steps: list[pb.PipelineStep]) -> list[domain.StepRequest]:
    requests: list[domain.StepRequest] = []
    for number, step in enumerate(steps, 1):
        kind = step.WhichOneof("kind")
        if kind == "model":
            requests.append(_step_ref(step.model))
        elif kind == "validations":
            requests.append(domain.ValidationsStep.of(step.validations.checks))
        elif kind == "shadow":
            # Rejected here because only the wire format can leave the champion out.
            if not step.shadow.HasField("champion"):
                raise InvalidArgument(f"step {number}: a shadow step needs a champion model")
            requests.append(
                domain.ShadowRef(
                    champion=_step_ref(step.shadow.champion),
                    challengers=tuple(_step_ref(c) for c in step.shadow.challengers),
                )
            )
        elif kind == "random_split":
            weighted = step.random_split
            if any(not arm.HasField("model") for arm in weighted.arms):
                raise InvalidArgument(f"step {number}: every arm of a random split needs a model")
            arms = tuple((arm.weight, _step_ref(arm.model)) for arm in weighted.arms)
            requests.append(domain.RandomSplitRef(arms, weighted.hash_key))
        elif kind == "key_split":
            split = step.key_split
            if not split.HasField("default_model"):
                raise InvalidArgument(f"step {number}: a key split needs a default model")
            routes = tuple((value, _step_ref(split.routes[value])) for value in sorted(split.routes))
            requests.append(domain.KeySplitRef(_step_ref(split.default_model), split.meta_key, routes))
        else:
            # Rejected here because only the wire format can express an empty step.
            raise InvalidArgument(
                f"step {number} is empty: set its model, validations, shadow, random_split or key_split"
            )
    return requests


def _step_ref(step: pb.ModelStep) -> domain.StepRef:
    return domain.StepRef(
        model=step.model, version=step.version, input_mapping=domain.input_mapping(step.input_mapping)
    )


def model_config(config: pb.ModelConfig) -> ModelConfig:
    try:
        return ModelConfig.from_proto(config)
    except ValueError as exc:
        raise InvalidArgument(f"model config: {exc}") from None


def resolved_step(step: domain.Step) -> pb.ResolvedStep:
    if isinstance(step, domain.ValidationsStep):
        return pb.ResolvedStep(checks=dict(step.checks))
    if isinstance(step, domain.ShadowStep):
        message = resolved_step(step.champion)
        message.challengers.extend(resolved_step(c) for c in step.challengers)
        return message
    if isinstance(step, domain.RandomSplitStep):
        return pb.ResolvedStep(
            arms=[resolved_step(a) for a in step.arms], weights=list(step.weights), hash_key=step.hash_key
        )
    if isinstance(step, domain.KeySplitStep):
        return pb.ResolvedStep(
            arms=[resolved_step(a) for a in step.arms], meta_key=step.meta_key, routes=dict(step.routes)
        )
    return pb.ResolvedStep(
        model=step.model,
        version=step.version,
        sha256=step.sha256,
        framework=step.framework,
        inputs=[s.to_proto() for s in step.inputs],
        outputs=[s.to_proto() for s in step.outputs],
        input_mapping=dict(step.input_mapping),
        config=step.config.to_proto(),
    )


def pipeline_version(pv: domain.PipelineVersion) -> pb.PipelineVersion:
    return pb.PipelineVersion(
        workspace=pv.workspace,
        pipeline=pv.pipeline,
        version=pv.version,
        steps=[resolved_step(s) for s in pv.steps],
        created_at=timestamp(pv.created_at),
    )


def topics(t: PipelineTopics) -> pb.PipelineTopics:
    return pb.PipelineTopics(inputs=t.inputs, outputs=t.outputs, errors=t.errors)


def autoscale(config: domain.Autoscale | None) -> pb.AutoscaleConfig | None:
    if config is None:
        return None
    return pb.AutoscaleConfig(**config.to_json())


def resources(hints: domain.Resources | None) -> pb.ResourceHints | None:
    return None if hints is None else pb.ResourceHints(cpus=hints.cpus, memory=hints.memory)


def autoscale_from(request: pb.DeployRequest) -> domain.Autoscale | None:
    """The request's autoscaling, with the defaults for fields left at 0."""
    if not request.HasField("autoscale"):
        return None
    a, defaults = request.autoscale, domain.Autoscale(0, 0)
    return domain.Autoscale(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        queue_age_threshold_s=a.queue_age_threshold_s or defaults.queue_age_threshold_s,
        scale_up_after_s=a.scale_up_after_s or defaults.scale_up_after_s,
        scale_down_after_s=a.scale_down_after_s or defaults.scale_down_after_s,
    )


def resources_from(request: pb.DeployRequest) -> domain.Resources | None:
    if not request.HasField("resources"):
        return None
    return domain.Resources(cpus=request.resources.cpus.strip(), memory=request.resources.memory.strip())


def deployment(d: domain.Deployment) -> pb.Deployment:
    return pb.Deployment(
        workspace=d.workspace,
        pipeline=d.pipeline,
        pipeline_version=d.pipeline_version,
        replicas=d.replicas,
        active=d.active,
        deployment_id=d.deployment_id,
        topics=topics(d.topics),
        updated_at=timestamp(d.updated_at),
        autoscale=autoscale(d.autoscale),
        resources=resources(d.resources),
    )


def pipeline(p: domain.Pipeline) -> pb.Pipeline:
    message = pb.Pipeline(
        workspace=p.workspace,
        name=p.name,
        versions=[pipeline_version(v) for v in p.versions],
        updated_at=timestamp(p.updated_at),
        status=p.status,
        tags=p.tags,
    )
    if p.deployment is not None:
        message.deployment.CopyFrom(deployment(p.deployment))
    return message


def deployment_spec(spec: domain.DeploymentSpec) -> pb.DeploymentSpec:
    d = spec.deployment
    return pb.DeploymentSpec(
        workspace=d.workspace,
        pipeline=d.pipeline,
        pipeline_version=d.pipeline_version,
        replicas=d.replicas,
        deployment_id=d.deployment_id,
        steps=[resolved_step(s) for s in spec.steps],
        topics=topics(d.topics),
        deployed_at=timestamp(d.updated_at),
        autoscale=autoscale(d.autoscale),
        resources=resources(d.resources),
    )


def deployment_spec_json(spec: domain.DeploymentSpec) -> str:
    """The value published on joey.deployments."""
    return json_format.MessageToJson(deployment_spec(spec), preserving_proto_field_name=True)


def deployment_status(status: domain.DeploymentStatus) -> pb.DeploymentStatus:
    message = pb.DeploymentStatus(
        status=status.status,
        ready=status.ready,
        message=status.message,
        replicas=[
            pb.ReplicaStatus(
                replica_id=r.replica_id,
                alive=r.alive,
                pipeline_version=r.pipeline_version,
                loaded=r.loaded,
                partitions=list(r.partitions),
                last_seen=timestamp(r.last_seen),
                error=r.error,
                queue_age_s=r.queue_age_s,
                deployment_id=r.deployment_id,
                phase=r.phase,
            )
            for r in status.replicas
        ],
    )
    if status.deployment is not None:
        message.deployment.CopyFrom(deployment(status.deployment))
    return message


def log_query(request: pb.QueryLogsRequest) -> domain.LogQuery:
    return domain.LogQuery(
        workspace=request.workspace,
        pipeline=request.pipeline,
        limit=request.limit,
        start=optional_datetime(request, "start"),
        end=optional_datetime(request, "end"),
        validity=_validity(request.validity),
        anomalies_only=request.anomalies_only,
        page_token=request.page_token,
    )


def _validity(value: int) -> domain.LogValidity:
    try:
        return _VALIDITY[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(f"unknown log validity {value}; use ALL, OK or FAILED") from None


def log_entry(e: domain.LogEntry) -> pb.LogEntry:
    return pb.LogEntry(
        request_id=e.request_id,
        time=timestamp(e.time),
        pipeline_version=e.pipeline_version,
        ok=e.ok,
        error=e.error,
        inputs_json=e.inputs_json,
        outputs_json=e.outputs_json,
        shadow_json=e.shadow_json,
        check_failures=list(e.check_failures),
        models=[pb.ModelRef(name=m.name, version=m.version, sha256=m.sha256) for m in e.models],
        elapsed_ns=list(e.elapsed_ns),
        input_partition=e.input_partition,
        input_offset=e.input_offset,
        raw_input=e.raw_input,
    )


def log_page(page: domain.LogPage) -> pb.QueryLogsResponse:
    return pb.QueryLogsResponse(
        entries=[log_entry(e) for e in page.entries], total=page.total, next_page_token=page.next_page_token
    )


def user(u: domain.User) -> pb.User:
    return pb.User(
        username=u.username, email=u.email, admin=u.admin, active=u.active, created_at=timestamp(u.created_at)
    )


def token_info(t: domain.TokenInfo) -> pb.TokenInfo:
    info = pb.TokenInfo(name=t.name, kind=t.kind, created_at=timestamp(t.created_at))
    if t.expires_at is not None:
        info.expires_at.CopyFrom(timestamp(t.expires_at))
    if t.last_used_at is not None:
        info.last_used_at.CopyFrom(timestamp(t.last_used_at))
    return info


def member(m: domain.Member) -> pb.WorkspaceMember:
    return pb.WorkspaceMember(username=m.username, role=m.role)


def audit_query(request: pb.QueryAuditRequest) -> domain.AuditQuery:
    return domain.AuditQuery(
        username=request.username,
        workspace=request.workspace,
        action=request.action,
        start=request.start.ToDatetime(tzinfo=UTC) if request.HasField("start") else None,
        end=request.end.ToDatetime(tzinfo=UTC) if request.HasField("end") else None,
        limit=request.limit,
    )


def audit_entry(e: domain.AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        time=timestamp(e.time),
        username=e.username,
        action=e.action,
        workspace=e.workspace,
        target=e.target,
        outcome=e.outcome,
        message=e.message,
    )
