"""The registry: every rule about workspaces, models, pipelines and deployments, in domain terms."""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from joey_core import heartbeats, kafka, topics
from joey_core.models import ERROR, READY, ArtifactFile, ModelConfig, ModelVersion
from joey_registry import page_tokens
from joey_registry.access import Access, Action, Caller
from joey_registry.artifacts import SHA256_PATTERN, ArtifactStore, spooled
from joey_registry.assays import Assays
from joey_registry.bridges import Bridges
from joey_registry.connections import Connections
from joey_registry.conversion import CHILD_CLAIM, Conversion, ConversionFailed, Conversions
from joey_registry.converters import CONVERTERS
from joey_registry.deploy_config import check_autoscale, check_resources
from joey_registry.domain import (
    Autoscale,
    DeletedModel,
    DeletedPipeline,
    Deployment,
    DeploymentSpec,
    DeploymentStatus,
    KeySplitRef,
    LogPage,
    LogQuery,
    Model,
    ModelDescription,
    ModelSearch,
    ModelVersionUse,
    Pipeline,
    PipelineSearch,
    PipelineVersion,
    RandomSplitRef,
    RandomSplitStep,
    ResolvedStep,
    Resources,
    ShadowRef,
    ShadowStep,
    Step,
    StepRef,
    StepRequest,
    UploadHeader,
    Workspace,
)
from joey_registry.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from joey_registry.identity import Identity
from joey_registry.identity_store import IdentityStore
from joey_registry.lineage import check_lineage, check_manifest, staged_files
from joey_registry.model_check import ModelCheck
from joey_registry.orchestrations import Orchestrations
from joey_registry.publisher import DeploymentPublisher
from joey_registry.settings import RegistrySettings
from joey_registry.status import UNDEPLOYED, compute_status
from joey_registry.steps import check_steps, key_split, map_inputs
from joey_registry.store import PipelineLock, Store, WorkspaceContents, WorkspaceRef
from joey_registry.tags import MAX_TAGS, check_search_term, check_tag
from joey_registry.tasks import Tasks
from joey_registry.validation import Signature, framework_name

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = "default"
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
KAFKA_ADMIN_TIMEOUT_S = 10.0
_ALREADY_GONE = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.GROUP_ID_NOT_FOUND})
UNKNOWN = "Unknown"  # a listed pipeline's status when the heartbeats or partitions could not be read
DEFAULT_LOG_LIMIT = 100
MAX_LOG_LIMIT = 10_000
_CONVERSION_MARGIN_S = 60.0  # beyond a conversion's own limits: storing its ONNX, a slow database


def _valid_name(kind: str, name: str) -> str:
    try:
        return topics.validate_name(kind, name)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _non_negative_version(what: str, version: int) -> int:
    if version < 0:
        raise InvalidArgument(f"{what} version must be a positive number or 0 for the latest, got {version}")
    return version


class Registry:
    def __init__(
        self,
        settings: RegistrySettings,
        store: Store,
        artifacts: ArtifactStore,
        publisher: DeploymentPublisher,
        admin: AdminClient,
        redis_client: redis.Redis,
    ) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.publisher = publisher
        self.admin = admin
        self.redis = redis_client
        self.access = Access(store)
        self.assays = Assays(store, self.access)
        self.connections = Connections(settings, store, self.access)
        self.bridges = Bridges(store, self.access, self.connections, publisher)
        self.identity = Identity(settings, IdentityStore(store.pool), self.access, redis_client)
        self.orchestrations = Orchestrations(settings, store, self.access, artifacts)
        self.tasks = Tasks(settings, store, self.access, self.identity)
        self.checks = ModelCheck(
            settings.upload_check_memory_mb, settings.upload_check_cpu_s, settings.upload_check_timeout_s
        )
        self.conversions = Conversions(
            settings.conversion_memory_mb,
            settings.conversion_cpu_s,
            settings.conversion_timeout_s,
            settings.conversion_concurrency,
            settings.max_upload_bytes,
            settings.conversion_require_sandbox,
            settings.conversion_max_file_bytes,
            settings.conversion_max_processes,
        )
        # Partition counts of inputs topics; partitions are never added, so a count never goes stale.
        self._partitions: dict[str, int] = {}

    # --- workspaces ---

    def create_workspace(self, caller: Caller, name: str) -> Workspace:
        owner = self.access.unscoped(caller)
        created = self.store.create_workspace(_valid_name("workspace", name), owner.username)
        if created is None:
            raise AlreadyExists(f"workspace {name!r} already exists")
        log.info("created workspace %s", name)
        return created

    def list_workspaces(self, caller: Caller) -> list[Workspace]:
        user = self.access.user(caller)
        found = self.store.list_workspaces(user.username, every=user.admin)
        return [w for w in found if caller.scope is None or w.name == caller.scope.name]

    def delete_workspace(self, caller: Caller, name: str) -> None:
        """Delete an empty workspace. What it holds is never deleted along with it: each delete of a
        model or pipeline has its own refusals (deployed, used, watched by assays)."""
        ws = self.access.authorize(caller, name, Action.MANAGE)
        if name == DEFAULT_WORKSPACE:
            raise FailedPrecondition(
                f"the {DEFAULT_WORKSPACE!r} workspace cannot be deleted: clients start in it"
            )

        def check(contents: WorkspaceContents) -> None:
            # In the order they can be deleted: bridges and assays hold their pipelines (bridges their
            # connections too), deployments their models.
            held = [
                (kind, names)
                for kind, names in (
                    ("task", contents.tasks),
                    ("orchestration", contents.orchestrations),
                    ("bridge", contents.bridges),
                    ("assay", contents.assays),
                    ("connection", contents.connections),
                    ("pipeline", contents.pipelines),
                    ("model", contents.models),
                )
                if names
            ]
            if held:
                what = "; ".join(f"{kind}s {', '.join(map(repr, names))}" for kind, names in held)
                how = ", ".join(
                    f"`joey -w {name} {'source|sink' if kind == 'bridge' else kind} delete {names[0]}`"
                    for kind, names in held
                )
                raise FailedPrecondition(
                    f"workspace {name!r} is not empty: it holds {what}; "
                    f"delete them first, in that order ({how})"
                )

        self.store.delete_workspace(ws, check)
        log.info("deleted workspace %s", name)

    # --- models ---

    def upload_model(
        self,
        caller: Caller,
        header: UploadHeader,
        chunks: Iterable[bytes],
        artifact_chunks: Iterable[bytes] = (),
    ) -> ModelVersion:
        """Spool, hash and validate the upload (the model's ``chunks``, then the bytes of the files the
        header declares), then store the model, its files and the version together (or none of them)."""
        ws = self.access.authorize(caller, header.workspace, Action.WRITE)
        name = _valid_name("model", header.name)
        framework = framework_name(header.framework)
        native = framework in CONVERTERS
        if native and header.outputs:
            raise InvalidArgument(
                f"framework {framework!r}: the outputs are the converted model's (label and "
                "probabilities of a classifier, variable otherwise, output of a PyTorch model): upload "
                "without an output schema"
            )
        if not native and header.sample_input is not None:
            raise InvalidArgument(
                f"a sample input verifies a conversion: framework {framework!r} is not converted; upload "
                "without it"
            )
        lineage = check_lineage(header)
        check_manifest(header.artifacts, self.settings.max_artifacts, self.settings.max_artifacts_bytes)
        staging = self.artifacts.staging_dir()
        with (
            spooled(chunks, staging, self.settings.max_upload_bytes, "JOEY_MAX_UPLOAD_BYTES") as (
                path,
                sha256,
                size,
            ),
            staged_files(header.artifacts, artifact_chunks, staging) as files,
        ):
            if size == 0:
                raise InvalidArgument(f"empty upload for model {name!r}: no artifact bytes were received")
            conversion: Conversion | None = None
            if native:
                # Loaded (or refused, nothing stored) now; converted once the version is stored.
                conversion = self.conversions.start(
                    framework, path, header.inputs, header.sample_input, staging
                )
                signature = Signature((), ())
            else:
                signature = self.checks.inspect(framework, path, Signature(header.inputs, header.outputs))
            stored_new: list[str] = []

            def store_artifacts() -> None:
                for digest, source in ((sha256, path), *((f.sha256, p) for f, p in files)):
                    if self.artifacts.put(digest, source):
                        stored_new.append(digest)

            try:
                version = self.store.add_model_version(
                    ws,
                    name,
                    "" if native else sha256,  # a native model's served artifact is its ONNX form, to come
                    0 if native else size,
                    framework,
                    signature.inputs,
                    signature.outputs,
                    store_artifacts,
                    lineage=lineage,
                    files=header.artifacts,
                    source=(sha256, size) if native else None,
                )
            except BaseException:
                # The rows were rolled back; artifacts stored only for them would be orphaned. Under
                # each artifact's lock, and only if unused: an upload of the same bytes may have found
                # the file meanwhile and recorded its own version.
                if conversion is not None:
                    conversion.abandon()
                if stored_new:
                    self.store.remove_artifacts(stored_new, self.artifacts.delete)
                raise
        if conversion is None:
            log.info(
                "stored model %s/%s version %d (%s, %d bytes)", ws.name, name, version.version, sha256, size
            )
            return version
        log.info(
            "converting model %s/%s version %d: %s", ws.name, name, version.version, conversion.description
        )
        threading.Thread(
            target=self._finish_conversion,
            args=(ws, version, conversion),
            name=f"convert-{ws.name}-{name}-{version.version}",
            daemon=True,
        ).start()
        return replace(version, conversion_log=f"loaded {conversion.description}")

    def _finish_conversion(self, ws: WorkspaceRef, version: ModelVersion, conversion: Conversion) -> None:
        lines: list[str] = []
        try:
            try:
                onnx_path, lines = conversion.finish()
                # The registry loads nothing native: the ONNX form is checked as an ONNX upload is.
                signature = self.checks.inspect("onnx", onnx_path, Signature((), ()))
                lines = [*lines, CHILD_CLAIM]
            except (ConversionFailed, InvalidArgument, Unavailable) as exc:
                lines = [*lines, *getattr(exc, "log_lines", []), f"error: {exc}"]
                self.store.finish_conversion(
                    ws, version.name, version.version, None, "\n".join(lines), _nothing
                )
                log.info("conversion of %s/%s v%d failed: %s", ws.name, version.name, version.version, exc)
                return
            sha256, size = _sha256(onnx_path)
            stored_new = False

            def store_onnx() -> None:
                nonlocal stored_new
                stored_new = self.artifacts.put(sha256, onnx_path)

            outcome = (sha256, size, signature.inputs, signature.outputs)
            if not self.store.finish_conversion(
                ws, version.name, version.version, outcome, "\n".join(lines), store_onnx
            ):
                log.info(
                    "model %s/%s v%d was deleted while converting", ws.name, version.name, version.version
                )
            log.info("converted model %s/%s v%d to ONNX %s", ws.name, version.name, version.version, sha256)
        except Exception:
            log.exception("conversion of %s/%s v%d failed", ws.name, version.name, version.version)
            try:
                self.store.finish_conversion(
                    ws, version.name, version.version, None, "\n".join([*lines, "error: internal"]), _nothing
                )
            except Exception:
                log.exception("could not record the failed conversion")
        finally:
            conversion.remove()

    def expire_conversions(self) -> int:
        """Mark as errors the conversions no registry is running any more: started longer ago than a
        conversion and its ONNX check may take (a registry that stopped meanwhile never finishes them).
        By age, not at start: other registries may be converting meanwhile."""
        settings = self.settings
        longest = settings.conversion_timeout_s + settings.upload_check_timeout_s + _CONVERSION_MARGIN_S
        return self.store.fail_stale_conversions(longest)

    def list_models(self, caller: Caller, workspace: str) -> list[Model]:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return self.store.list_models(ws)

    def search_models(self, caller: Caller, workspace: str, search: ModelSearch) -> list[Model]:
        """The models with a version matching every filter of ``search``, with only those versions."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        checked = replace(
            search,
            search_term=check_search_term(search.search_term or ""),
            tag=check_tag(search.tag) if search.tag else None,
            framework=framework_name(search.framework) if search.framework else None,
        )
        return self.store.search_models(ws, checked)

    def model_artifacts(
        self, caller: Caller, workspace: str, name: str, version: int
    ) -> tuple[int, tuple[ArtifactFile, ...]]:
        """The version listed (0 = the latest) and the files it carries, by name."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        number = self._model_version(ws, name, version).version
        found = self.store.model_artifacts(ws, name, number)
        if found is None:
            raise NotFound(f"model {name!r} version {number} was deleted in workspace {ws.name!r}")
        return found

    def set_tag(
        self, caller: Caller, workspace: str, kind: str, name: str, tag: str, add: bool
    ) -> tuple[str, ...]:
        """Add (or remove) ``tag`` of the model or pipeline ``name``: its tags after. Idempotent."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        if kind not in ("model", "pipeline"):
            raise InvalidArgument("a tag needs its target: set model or pipeline")
        tags = self.store.set_tag(ws, kind, name, check_tag(tag), add, MAX_TAGS)
        if tags is None:
            raise NotFound(f"{kind} {name!r} not found in workspace {ws.name!r}")
        log.info("%s tag %s of %s %s/%s", "added" if add else "removed", tag, kind, ws.name, name)
        return tags

    def get_model(self, caller: Caller, workspace: str, name: str) -> Model:
        return self._model(self.access.authorize(caller, workspace, Action.READ), name)

    def _model(self, ws: WorkspaceRef, name: str) -> Model:
        model = self.store.get_model(ws, name)
        if model is None:
            raise NotFound(f"model {name!r} not found in workspace {ws.name!r}")
        return model

    def describe_model(self, caller: Caller, workspace: str, name: str) -> ModelDescription:
        """The model's versions and every pipeline version that uses one of them."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        return ModelDescription(self._model(ws, name), tuple(self.store.model_uses(ws, name)))

    def delete_model(
        self, caller: Caller, workspace: str, name: str, version: int, all_versions: bool = False
    ) -> DeletedModel:
        """Delete ``version`` of the model, or with ``all_versions`` every version and the model (the
        model stays when only its versions are deleted, so its numbering goes on). Refused while the
        current version of an active deployment uses a version to delete; pipeline versions not
        deployed may keep referring to it, and deploying one of them later is refused (see ``_deploy``).
        Artifacts no model version refers to any more are removed once the deletion has committed."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        if all_versions and version:
            raise InvalidArgument(
                f"give either version ({version}) or all_versions to delete model {name!r}, not both"
            )
        if not all_versions and version <= 0:
            raise InvalidArgument(
                f"version of model {name!r} to delete must be 1 or more, got {version}; "
                "to delete every version and the model, ask for all versions (`joey model delete NAME`)"
            )

        def choose(existing: tuple[int, ...], uses: list[ModelVersionUse]) -> tuple[int, ...]:
            if not all_versions and version not in existing:
                listed = ", ".join(map(str, existing)) or "none left"
                raise NotFound(
                    f"model {name!r} has no version {version} in workspace {workspace!r} (versions: {listed})"
                )
            chosen = existing if all_versions else (version,)
            blocking = [u for u in uses if u.deployed and u.model_version in chosen]
            if blocking:
                what = f"model {name!r}" if all_versions else f"version {version} of model {name!r}"
                users = ", ".join(
                    f"pipeline {u.pipeline!r} (version {u.pipeline_version} uses {name} v{u.model_version})"
                    for u in blocking
                )
                first = blocking[0].pipeline
                raise FailedPrecondition(
                    f"{what} is in use by deployed {users}; undeploy it first (`joey pipeline undeploy "
                    f"{first}`) or deploy a pipeline version without it"
                )
            return chosen

        found = self.store.delete_model(ws, name, choose, delete_model=all_versions)
        if found is None:
            raise NotFound(f"model {name!r} not found in workspace {workspace!r}")
        deleted, sha256s = found
        removed = self.store.remove_artifacts(sha256s, self.artifacts.delete)
        log.info(
            "deleted model %s/%s versions %s%s, %d artifacts removed",
            ws.name,
            name,
            ",".join(map(str, deleted.versions)),
            " (and the model)" if deleted.model_deleted else "",
            removed,
        )
        return deleted

    def get_model_version(self, caller: Caller, workspace: str, name: str, version: int) -> ModelVersion:
        ws = self.access.authorize(caller, workspace, Action.READ)
        return self._model_version(ws, name, version)

    def configure_model(
        self, caller: Caller, workspace: str, name: str, version: int, config: ModelConfig
    ) -> ModelVersion:
        """Set how the engine runs a model version (0 = the latest). Pipeline versions keep the config
        their steps were resolved with: the next one created (a deploy of the current steps) takes it."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        self._model_version(ws, name, version)  # NotFound naming the latest version
        configured = self.store.configure_model_version(ws, name, version, config)
        if configured is None:  # deleted meanwhile
            raise NotFound(f"model {name!r} has no version {version} in workspace {ws.name!r}")
        log.info("configured model %s/%s v%d: %s", ws.name, name, configured.version, config)
        return configured

    def _model_version(self, ws: WorkspaceRef, name: str, version: int) -> ModelVersion:
        found = self.store.get_model_version(ws, name, _non_negative_version(f"model {name!r}", version))
        if found is not None:
            return found
        latest = self.store.get_model_version(ws, name, 0)
        if latest is None:
            raise NotFound(f"model {name!r} not found in workspace {ws.name!r}")
        raise NotFound(
            f"model {name!r} has no version {version} in workspace {ws.name!r} (latest is {latest.version})"
        )

    def artifact_chunks(self, caller: Caller, workspace: str, sha256: str) -> Iterator[bytes]:
        """The bytes of a model of ``workspace`` or, for a user, of a model version's file: the service
        token fetches what engines run, not the notebooks and data that travel with a version."""
        ws = self.access.authorize(caller, workspace, Action.FETCH_ARTIFACT)
        if not SHA256_PATTERN.match(sha256):
            raise InvalidArgument(f"not a sha256 hex digest (64 lowercase hex characters): {sha256!r}")
        if not self.store.has_artifact(ws, sha256, files=not caller.is_service):
            raise NotFound(f"no model version with artifact {sha256} in workspace {workspace!r}")
        if not self.artifacts.exists(sha256):
            raise NotFound(f"artifact {sha256} is recorded but missing from the artifact store")
        return self.artifacts.read_chunks(sha256, DOWNLOAD_CHUNK_BYTES)

    # --- pipelines ---

    def create_pipeline(
        self, caller: Caller, workspace: str, name: str, steps: list[StepRequest]
    ) -> PipelineVersion:
        """A new pipeline version when the resolved steps differ from the latest, else the latest."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        _valid_name("pipeline", name)
        if not steps:
            raise InvalidArgument(f"pipeline {name!r} needs at least one step")
        resolved: list[Step] = []
        for number, ref in enumerate(steps, 1):
            if isinstance(ref, StepRef):
                resolved.append(self._resolve(ws, number, ref))
            elif isinstance(ref, ShadowRef):
                champion = self._resolve(ws, number, ref.champion, "champion ")
                challengers = tuple(self._resolve(ws, number, c, "challenger ") for c in ref.challengers)
                resolved.append(ShadowStep(champion, challengers))
            elif isinstance(ref, RandomSplitRef):
                arms = tuple(self._resolve(ws, number, arm, "arm ") for _, arm in ref.arms)
                resolved.append(RandomSplitStep(arms, tuple(w for w, _ in ref.arms), ref.hash_key))
            elif isinstance(ref, KeySplitRef):
                default = self._resolve(ws, number, ref.default, "default ")
                routes = [(v, self._resolve(ws, number, m, f"route {v!r} ")) for v, m in ref.routes]
                resolved.append(key_split(number, default, ref.meta_key, routes))
            else:
                resolved.append(ref)
        check_steps(resolved)
        version, created = self.store.add_pipeline_version(ws, name, tuple(resolved))
        if created:
            log.info("created pipeline %s/%s version %d", ws.name, name, version.version)
        return version

    def _resolve(self, ws: WorkspaceRef, number: int, ref: StepRef, role: str = "") -> ResolvedStep:
        """``ref`` pinned to a model version (0 = the latest now); ``role`` is its part in a shadow step."""
        try:
            found = self._model_version(ws, ref.model, ref.version)
        except (NotFound, InvalidArgument) as exc:
            raise type(exc)(f"step {number}: {role}{exc}") from None
        if found.status != READY:
            last = found.conversion_log.splitlines()[-1:] or [""]
            why = f" ({last[0]})" if found.status == ERROR else ""
            raise FailedPrecondition(
                f"step {number}: {role}model {found.name!r} version {found.version} is {found.status}, not "
                f"ready{why}; a pipeline serves ready versions only (see `joey model get {found.name}`)"
            )
        model_step = ResolvedStep.of(found)
        return map_inputs(number, model_step, ref.input_mapping, role)

    def get_pipeline(self, caller: Caller, workspace: str, name: str) -> Pipeline:
        ws = self.access.authorize(caller, workspace, Action.READ)
        pipeline = self.store.get_pipeline(ws, name)
        if pipeline is None:
            raise NotFound(f"pipeline {name!r} not found in workspace {workspace!r}")
        return pipeline

    def list_pipelines(
        self, caller: Caller, workspace: str, search: PipelineSearch | None = None
    ) -> list[Pipeline]:
        """Every pipeline (matching ``search``) with its deployment's status now, from the deployments
        just loaded: the heartbeats of the active ones in one Redis read, the partitions of their inputs
        topics from the cache (one Kafka call for those not cached). A read changes nothing; when Redis
        or Kafka does not answer, the status of the active ones is "Unknown" rather than the listing
        failing."""
        ws = self.access.authorize(caller, workspace, Action.READ)
        if search is not None:
            search = PipelineSearch(
                check_search_term(search.search_term or ""), check_tag(search.tag) if search.tag else None
            )
        pipelines = self.store.list_pipelines(ws, search)
        active = [p for p in pipelines if p.deployment is not None and p.deployment.active]
        try:
            views = heartbeats.read_many(
                self.redis, self.settings.redis_prefix, [(ws.name, p.name) for p in active]
            )
        except redis.RedisError as exc:
            log.warning("listing pipelines of %s without their status: Redis: %s", ws.name, exc)
            views = None
        partitions = self._cached_partitions([p.deployment.topics.inputs for p in active if p.deployment])
        listed = []
        for p in pipelines:
            if p.deployment is None or not p.deployment.active:
                status = UNDEPLOYED
            elif views is None or partitions is None:
                status = UNKNOWN
            else:
                inputs = p.deployment.topics.inputs
                status = compute_status(p.deployment, views[(ws.name, p.name)], partitions.get(inputs)).status
            listed.append(replace(p, status=status))
        return listed

    def _cached_partitions(self, inputs: list[str]) -> dict[str, int] | None:
        """The partition counts of ``inputs`` topics, asking Kafka once for those not cached; None
        when Kafka does not answer. A missing topic is left out."""
        missing = [t for t in inputs if t not in self._partitions]
        if missing:
            try:
                self._partitions.update(kafka.topic_partitions(self.admin, missing))
            except (KafkaException, TimeoutError) as exc:
                log.warning("listing pipelines without their status: Kafka: %s", exc)
                return None
        return {t: self._partitions[t] for t in inputs if t in self._partitions}

    def delete_pipeline(self, caller: Caller, workspace: str, name: str) -> DeletedPipeline:
        """Delete an undeployed pipeline with its versions, deployment history and inference logs,
        then (best effort) its topics, the engines' consumer group and its replicas' heartbeats, so a
        new pipeline of the same name inherits nothing. Refused while it is deployed, while a replica
        of it is still alive (finishing its batch), and while assays watch it (their baselines and
        results are worth keeping: the user deletes them by name)."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self._locked(ws, name) as lock:
            current = lock.deployment()
            if current is not None and current.active:
                raise FailedPrecondition(
                    f"pipeline {name!r} is deployed (version {current.pipeline_version}, "
                    f"{_plural(current.replicas, 'replica')}, deployment {current.deployment_id}); "
                    f"undeploy it first: `joey pipeline undeploy {name}`"
                )
            used_by = lock.bridge_names()
            if used_by:
                raise FailedPrecondition(
                    f"pipeline {name!r} is used by bridges {', '.join(map(repr, used_by))}; delete them "
                    f"first (`joey source delete` / `joey sink delete`)"
                )
            assays = lock.assay_names()
            if assays:
                raise FailedPrecondition(
                    f"pipeline {name!r} is watched by assays {', '.join(map(repr, assays))}; delete them "
                    f"first: `joey assay delete {assays[0]}`"
                )
            # An undeployed replica finishes its batch before it stops: what it still consumes and
            # logs would otherwise outlive the deletion.
            try:
                views = heartbeats.read(self.redis, self.settings.redis_prefix, ws.name, name)
                alive = [v.beat.replica_id for v in views if v.alive]
            except redis.RedisError as exc:
                raise Unavailable(
                    f"could not read the replica heartbeats of pipeline {name!r} from Redis: {exc}; "
                    "retry once Redis answers"
                ) from exc
            if alive:
                raise FailedPrecondition(
                    f"pipeline {name!r} has {_plural(len(alive), 'replica')} still stopping "
                    f"({', '.join(alive)}); retry in a few seconds"
                )
            deleted = lock.delete()
        log.info(
            "deleted pipeline %s/%s: %d versions, %d log entries",
            ws.name,
            name,
            deleted.versions,
            deleted.log_entries,
        )
        self._forget_pipeline(ws.name, name)
        return deleted

    def _forget_pipeline(self, workspace: str, pipeline: str) -> None:
        """After a pipeline's deletion committed: delete its topics (with the input records still
        waiting in them), the engines' consumer group (with its offsets), the replicas' heartbeats and
        the engines' attempt notes.
        Best effort: the deletion stands; what fails is logged, and a new pipeline of the same name
        would find it (old records and offsets, or stale dead replicas)."""
        names = topics.pipeline_topics(workspace, pipeline)
        group = topics.engine_group(workspace, pipeline)
        for topic in names.all():
            self._partitions.pop(topic, None)
        for what, futures in (
            (
                "consumer group",
                self.admin.delete_consumer_groups([group], request_timeout=KAFKA_ADMIN_TIMEOUT_S),
            ),
            ("topic", self.admin.delete_topics(list(names.all()), operation_timeout=KAFKA_ADMIN_TIMEOUT_S)),
        ):
            for name, future in futures.items():
                try:
                    future.result()
                except KafkaException as exc:
                    # Never deployed, or never consumed: there was nothing to delete.
                    if exc.args[0].code() not in _ALREADY_GONE:
                        log.warning(
                            "pipeline %s/%s deleted, but not its %s %s: %s",
                            workspace,
                            pipeline,
                            what,
                            name,
                            exc,
                        )
        try:
            heartbeats.forget_pipeline(self.redis, self.settings.redis_prefix, workspace, pipeline)
            self.redis.delete(topics.attempt_notes_key(self.settings.redis_prefix, group))
        except redis.RedisError as exc:
            log.warning(
                "pipeline %s/%s deleted, but not its replicas' heartbeats or attempt notes: %s",
                workspace,
                pipeline,
                exc,
            )

    def _require_pipeline(self, ws: WorkspaceRef, name: str) -> None:
        if not self.store.pipeline_exists(ws, name):
            raise NotFound(f"pipeline {name!r} not found in workspace {ws.name!r}")

    # --- deployments ---

    def deploy(
        self,
        caller: Caller,
        workspace: str,
        pipeline: str,
        version: int,
        replicas: int | None,
        autoscale: Autoscale | None = None,
        resources: Resources | None = None,
    ) -> Deployment:
        """Record the intent, publish the new deployment, and record it once the broker acknowledged it
        (see ``_change``): a failed publish is UNAVAILABLE and changes nothing. On a running deployment,
        engines roll the new one out while the current one keeps serving. ``replicas`` None is the
        default (1, or the autoscaling minimum)."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        replicas = self._replicas(replicas, autoscale)
        check_resources(resources)
        _non_negative_version(f"pipeline {pipeline!r}", version)
        with self._locked(ws, pipeline, "create it with at least one step before deploying it") as lock:
            return self._deploy(lock, version, replicas, autoscale, resources)

    def rollback(self, caller: Caller, workspace: str, pipeline: str, version: int) -> Deployment:
        """Redeploy ``version`` (0 = the one deployed before the current one) with the current
        deployment's replicas, autoscaling and resources, rolled out like any deploy."""
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        _non_negative_version(f"pipeline {pipeline!r}", version)
        with self._locked(ws, pipeline) as lock:
            current = lock.deployment()
            if current is None or not current.active:
                raise FailedPrecondition(
                    f"pipeline {pipeline!r} in workspace {workspace!r} is not deployed; "
                    "deploy the version you want instead"
                )
            target = version or lock.previous_version(current)
            if target is None:
                raise FailedPrecondition(
                    f"pipeline {pipeline!r} has no earlier deployed version than the current "
                    f"version {current.pipeline_version}; name the version to roll back to"
                )
            if target == current.pipeline_version:
                raise FailedPrecondition(
                    f"pipeline {pipeline!r} already runs version {target}; name another version"
                )
            log.info(
                "rolling %s/%s back from v%d to v%d", ws.name, pipeline, current.pipeline_version, target
            )
            return self._deploy(lock, target, current.replicas, current.autoscale, current.resources)

    @contextmanager
    def _locked(self, ws: WorkspaceRef, pipeline: str, hint: str = "") -> Iterator[PipelineLock]:
        """The pipeline's row lock for the block; NotFound (with ``hint``) when there is no such pipeline.
        Postgres failing (refusing the commit, or not answering) is UNAVAILABLE: the transaction is rolled
        back, and a change it may have published meanwhile is undone by the reconciler (see ``_change``)."""
        try:
            with self.store.lock_pipeline(ws, pipeline) as lock:
                if lock is None:
                    found = f"pipeline {pipeline!r} not found in workspace {ws.name!r}"
                    raise NotFound(f"{found}; {hint}" if hint else found)
                yield lock
        except psycopg.OperationalError as exc:
            # The detail may name hosts: it stays in the log.
            log.warning("pipeline %s/%s: Postgres failed: %s", ws.name, pipeline, exc)
            raise Unavailable(
                f"the database did not answer; the change of pipeline {pipeline!r} may not have been "
                "applied: check `joey pipeline status` before retrying"
            ) from exc

    def _replicas(self, replicas: int | None, autoscale: Autoscale | None) -> int:
        """The replicas to start with (None: the default), after checking them and ``autoscale``
        against the partitions. An explicit 0 is refused: it never means the default."""
        limit = self.settings.pipeline_partitions
        if autoscale is not None:
            check_autoscale(autoscale, limit)
            replicas = autoscale.min_replicas if replicas is None else replicas
            if not autoscale.min_replicas <= replicas <= autoscale.max_replicas:
                raise InvalidArgument(
                    f"replicas ({replicas}) must be between the autoscaling min ({autoscale.min_replicas}) "
                    f"and max ({autoscale.max_replicas}); leave replicas unset to start at the min"
                )
            return replicas
        replicas = 1 if replicas is None else replicas
        if not 1 <= replicas <= limit:
            raise InvalidArgument(
                f"replicas must be between 1 and {limit} (the partitions of each pipeline topic, "
                f"JOEY_PIPELINE_PARTITIONS), got {replicas}; to stop serving, undeploy the pipeline"
            )
        return replicas

    def _deploy(
        self,
        lock: PipelineLock,
        version: int,
        replicas: int,
        autoscale: Autoscale | None,
        resources: Resources | None,
    ) -> Deployment:
        pv = lock.version(version)
        if pv is None:
            raise NotFound(
                f"pipeline {lock.name!r} has no version {version} in workspace {lock.workspace.name!r}"
            )
        ws_name, pipeline = lock.workspace.name, lock.name
        missing = lock.missing_models(pv.steps)
        if missing:
            gone = ", ".join(f"{m.model} v{m.version}" for m in missing)
            raise FailedPrecondition(
                f"pipeline {pipeline!r} version {pv.version} uses deleted model versions {gone}; "
                "create a new pipeline version with models that exist and deploy that"
            )
        self._ensure_topics(ws_name, pipeline, autoscale.max_replicas if autoscale else replicas)
        deployment = Deployment(
            workspace=ws_name,
            pipeline=pipeline,
            pipeline_version=pv.version,
            replicas=replicas,
            active=True,
            deployment_id=str(uuid.uuid4()),
            topics=topics.pipeline_topics(ws_name, pipeline),
            updated_at=datetime.now(UTC),
            autoscale=autoscale,
            resources=resources,
        )
        return self._change(lock, deployment, pv.steps)

    def _change(self, lock: PipelineLock, change: Deployment, steps: tuple[Step, ...]) -> Deployment:
        """Make ``change`` the pipeline's deployment, in this order: commit the intent, publish ``change``
        (its spec, or the tombstone of an inactive one) and wait for the broker's acknowledgement, then
        record it and drop the intent in the lock's transaction. Until that commits, readers see the
        previous deployment. When the publish fails (UNAVAILABLE), the registry dies, or the commit fails,
        the intent stays behind: the broker may have taken the record without acknowledging it, so
        ``reconcile`` publishes again what Postgres holds, and both agree once the broker answers."""
        self.store.record_intent(
            lock.workspace.name, lock.name, change.deployment_id if change.active else None
        )
        self._publish(change, steps)
        lock.save_deployment(change)
        lock.clear_intent()
        return change

    def _publish(self, deployment: Deployment, steps: tuple[Step, ...]) -> None:
        if deployment.active:
            self.publisher.publish(DeploymentSpec(deployment, steps))
        else:
            self.publisher.retract(deployment.workspace, deployment.pipeline)

    def scale(self, workspace: str, pipeline: str, deployment_id: str, replicas: int) -> Deployment | None:
        """Set the replicas of a running deployment (the autoscaler's call): same deployment id, so
        engines add or remove replicas without a rollout. None when that deployment is no longer current."""
        ws = self.store.workspace(workspace)
        if ws is None:
            return None
        try:
            # _locked: Postgres failing here is UNAVAILABLE, as for a user's change.
            with self._locked(ws, pipeline) as lock:
                current = lock.deployment()
                if current is None or not current.active or current.deployment_id != deployment_id:
                    return None
                if current.replicas == replicas:
                    return current
                pv = lock.version(current.pipeline_version)
                assert pv is not None
                return self._change(
                    lock, replace(current, replicas=replicas, updated_at=datetime.now(UTC)), pv.steps
                )
        except NotFound:  # the pipeline was deleted meanwhile
            return None

    def undeploy(self, caller: Caller, workspace: str, pipeline: str) -> Deployment:
        ws = self.access.authorize(caller, workspace, Action.WRITE)
        with self._locked(ws, pipeline) as lock:
            current = lock.deployment()
            if current is None or not current.active:
                raise FailedPrecondition(f"pipeline {pipeline!r} in workspace {workspace!r} is not deployed")
            return self._change(lock, replace(current, active=False, updated_at=datetime.now(UTC)), ())

    def _ensure_topics(self, workspace: str, pipeline: str, replicas: int) -> None:
        inputs = topics.pipeline_topics(workspace, pipeline).inputs
        try:
            counts = kafka.ensure_topics(
                self.admin, kafka.pipeline_topic_specs(self.settings, workspace, pipeline)
            )
        except (KafkaException, TimeoutError) as exc:
            raise Unavailable(f"could not create the topics of pipeline {pipeline!r}: {exc}") from exc
        count = self._partitions[inputs] = counts[inputs]
        if count < replicas:
            raise FailedPrecondition(
                f"topic {inputs} has {count} partitions, fewer than the {replicas} replicas requested; "
                f"partitions cannot be added, so deploy at most {count} replicas"
            )

    def _input_partitions(self, topic: str) -> int | None:
        if topic not in self._partitions:
            try:
                count = kafka.topic_partitions(self.admin, [topic]).get(topic)
            except KafkaException as exc:
                raise Unavailable(f"could not read the partitions of {topic}: {exc}") from exc
            if count is None:
                return None
            self._partitions[topic] = count
        return self._partitions[topic]

    def deployment_status(self, caller: Caller, workspace: str, pipeline: str) -> DeploymentStatus:
        ws = self.access.authorize(caller, workspace, Action.READ)
        self._require_pipeline(ws, pipeline)
        deployment = self.store.deployment(ws, pipeline)
        prefix = self.settings.redis_prefix
        try:
            heartbeats.forget_dead(
                self.redis, prefix, ws.name, pipeline, self.settings.forget_replicas_after_s
            )
            views = heartbeats.read(self.redis, prefix, ws.name, pipeline)
        except redis.RedisError as exc:
            raise Unavailable(f"could not read replica heartbeats from Redis: {exc}") from exc
        partitions = None
        if deployment is not None and deployment.active:
            partitions = self._input_partitions(deployment.topics.inputs)
        return compute_status(deployment, views, partitions)

    def reconcile(self, everything: bool) -> int:
        """Publish again what Postgres holds for each pipeline with an intent left behind (see ``_change``)
        and, when ``everything`` (at start), for every pipeline ever deployed: the spec of its deployment
        (its topics recreated first) or, undeployed or gone, a tombstone. So a broker that lost its data
        learns the desired state back, and a change Postgres did not record is withdrawn; engines ignore
        a spec they already run. Returns how many pipelines were published. A pipeline the broker does not
        answer for is logged and left for the next round (at start, an intent is recorded for it so the
        running reconciler retries it), the others are reconciled; UNAVAILABLE at the end names them."""
        keys = set(self.store.intents())
        if everything:
            keys.update(self.store.deployed_pipelines())
        if keys and not everything:
            # A broker that restarted empty no longer has joey.deployments: auto-created, it would not
            # be the compacted single-partition topic engines read. (At start the registry has just
            # created them.)
            try:
                kafka.ensure_topics(self.admin, kafka.platform_topics(self.settings))
            except (KafkaException, TimeoutError) as exc:
                raise Unavailable(f"could not create the platform topics: {exc}") from exc
        published = 0
        left: list[str] = []
        for workspace, pipeline in sorted(keys):
            try:
                published += self._reconcile(workspace, pipeline, everything)
            except Unavailable as exc:
                log.warning("not reconciled yet, %s/%s: %s", workspace, pipeline, exc)
                left.append(f"{workspace}/{pipeline}")
                if everything:
                    self.store.record_intent(workspace, pipeline, None)
        if left:
            raise Unavailable(
                f"{len(left)} pipelines left to reconcile with {topics.DEPLOYMENTS} ({', '.join(left[:5])}"
                f"{', ...' if len(left) > 5 else ''}): the broker did not answer; retried every round"
            )
        return published

    def _reconcile(self, workspace: str, pipeline: str, everything: bool) -> bool:
        with self.store.lock_name(workspace, pipeline) as lock:
            # Under the lock a change in progress has finished: its intent is gone if it succeeded.
            if not everything and not lock.has_intent():
                return False
            if not isinstance(lock, PipelineLock):  # deleted since its intent was recorded
                self.publisher.retract(workspace, pipeline)
                lock.clear_intent()
                return True
            current = lock.deployment()
            steps: tuple[Step, ...] = ()
            if current is not None and current.active:
                try:
                    self._ensure_topics(
                        workspace,
                        pipeline,
                        current.autoscale.max_replicas if current.autoscale else current.replicas,
                    )
                except FailedPrecondition as exc:
                    # Topics with fewer partitions than the replicas: still what Postgres holds, and
                    # what must replace any record Postgres did not; the engines run what fits.
                    log.error("republishing %s/%s although: %s", workspace, pipeline, exc)
                pv = lock.version(current.pipeline_version)
                assert pv is not None
                steps = pv.steps
            if current is None:
                self.publisher.retract(workspace, pipeline)
            else:
                self._publish(current, steps)
            lock.clear_intent()
        return True

    # --- inference logs ---

    def query_logs(self, caller: Caller, query: LogQuery) -> LogPage:
        ws = self.access.authorize(caller, query.workspace, Action.READ)
        self._require_pipeline(ws, query.pipeline)
        limit = query.limit or DEFAULT_LOG_LIMIT
        if not 1 <= limit <= MAX_LOG_LIMIT:
            raise InvalidArgument(
                f"limit must be between 1 and {MAX_LOG_LIMIT} (0 = {DEFAULT_LOG_LIMIT}), got {limit}"
            )
        if query.start is not None and query.end is not None and query.start > query.end:
            raise InvalidArgument(f"start {query.start.isoformat()} is after end {query.end.isoformat()}")
        after, counted = page_tokens.decode(query, query.page_token) if query.page_token else (None, None)
        # Only the first page counts; later pages repeat its total, so paging through a large
        # log costs one count, and the total stays the same from page to page.
        found = self.store.query_logs(query, limit, after, count=counted is None)
        total = counted if counted is not None else found.total or 0
        token = page_tokens.encode(query, found.following, total) if found.following else ""
        return LogPage(found.entries, total, token)


def _nothing() -> None:
    pass


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(DOWNLOAD_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest(), path.stat().st_size


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun if count == 1 else noun + 's'}"
