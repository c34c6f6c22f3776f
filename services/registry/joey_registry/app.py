"""Entry point of the registry service (`joey serve registry`)."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pydantic
import redis

from joey_core import db, kafka, lifecycle, tls, topics
from joey_core.v1 import registry_pb2_grpc
from joey_registry.artifacts import create_store
from joey_registry.autoscaler import Autoscaler
from joey_registry.errors import Unavailable
from joey_registry.grpc_server import RegistryServicer
from joey_registry.identity import BootstrapRefused
from joey_registry.publisher import DeploymentPublisher
from joey_registry.reconciler import Reconciler
from joey_registry.service import Registry
from joey_registry.settings import RegistrySettings
from joey_registry.store import Store
from joey_registry.upload_gate import UploadGate

log = logging.getLogger(__name__)

# Uploads arrive in chunks; leave room above the usual 1 MiB chunk a client sends.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class RegistryServer:
    """The registry with its connections and gRPC server; start() returns the bound port
    (``registry_addr`` may use port 0 to pick a free one)."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.store = Store(settings.database_url.get_secret_value(), settings.db_pool_size)
        self.publisher = DeploymentPublisher(settings)
        self.registry = Registry(
            settings,
            self.store,
            create_store(settings),
            self.publisher,
            kafka.admin_client(settings),
            redis.Redis.from_url(settings.redis_url.get_secret_value()),
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.grpc_max_workers, thread_name_prefix="registry-rpc"
            ),
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        # Uploads are admitted up to a limit below the pool's size: the other threads serve other calls.
        uploads = UploadGate(
            settings.upload_concurrency,
            settings.upload_per_caller,
            settings.upload_idle_timeout_s,
            settings.upload_deadline_s,
        )
        servicer = RegistryServicer(self.registry, uploads)
        registry_pb2_grpc.add_RegistryServicer_to_server(servicer, self.server)
        self.autoscaler = Autoscaler(self.registry, settings.autoscale_interval_s)
        self.reconciler = Reconciler(self.registry, settings.reconcile_interval_s)
        self.port = 0

    def start(self) -> int:
        self.store.open()
        try:
            self.registry.identity.bootstrap()
        except BootstrapRefused:
            self.store.close()
            raise
        if resealed := self.registry.connections.reseal():
            log.info("sealed the secrets of %d connections under the first key of JOEY_SECRET_KEY", resealed)
        kafka.ensure_topics(self.registry.admin, kafka.platform_topics(self.settings))
        try:
            republished = self.registry.reconcile(everything=True)
        except Unavailable as exc:
            # The others were republished; the reconciler retries these, the registry serves meanwhile.
            log.warning("joey.deployments not reconciled with Postgres at start: %s", exc)
        else:
            log.info("reconciled joey.deployments with Postgres: %d pipelines republished", republished)
        try:
            log.info("republished %d bridges on %s", self.registry.bridges.republish(), topics.BRIDGES)
        except Unavailable as exc:
            # Published again by the next start; a change to a bridge publishes it too.
            log.warning("bridges not republished at start: %s", exc)
        self.port = tls.add_port(self.server, self.settings.registry_addr, self.settings)
        if not self.port:
            raise OSError(f"could not listen on {self.settings.registry_addr} (JOEY_REGISTRY_ADDR)")
        self.server.start()
        self.autoscaler.start()
        self.reconciler.start()
        log.info(
            "registry listening on %s (port %d, %s)",
            self.settings.registry_addr,
            self.port,
            "TLS" if self.settings.tls_cert else "plaintext",
        )
        return self.port

    def stop(self) -> None:
        self.autoscaler.stop()
        self.reconciler.stop()
        self.server.stop(self.settings.grpc_grace_s).wait()
        self.publisher.close()
        self.registry.checks.close()
        self.store.close()
        log.info("registry stopped")


def serve() -> None:
    lifecycle.harden_process()
    try:
        settings = RegistrySettings()
    except pydantic.ValidationError as exc:
        raise SystemExit(f"the registry cannot start: {exc}") from None
    lifecycle.configure_logging(settings)
    stop = lifecycle.shutdown_event()
    db.prepare(settings.database_url.get_secret_value())
    kafka.wait_for_broker(kafka.client_config(settings), timeout=60)
    server = RegistryServer(settings)
    try:
        server.start()
    except BootstrapRefused as exc:
        raise SystemExit(f"the registry cannot start: {exc}") from None
    try:
        stop.wait()
    finally:
        server.stop()
