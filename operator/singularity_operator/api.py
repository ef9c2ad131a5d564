"""The SingularityStack custom resource, as pydantic models: the one source of truth.

The CRD's OpenAPI schema is generated from these models (`crd.py`), and the operator parses every
object it sees with them, so the schema the API server enforces and the checks the operator makes
cannot drift apart. What a structural schema cannot express on Kubernetes 1.20 (exactly one of
`managed` / `external`) is checked here and reported as a `Ready=False` condition.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from singularity_stack.provision import budget

GROUP = "singularity.dev"
VERSION = "v1alpha1"
KIND = "SingularityStack"
PLURAL = "singularitystacks"
SINGULAR = "singularitystack"
SHORT_NAMES = ["sstack"]
DEFAULT_IMAGE = "singularity-stack:0.1.0"
MAX_INSTANCES = 200

KubeName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


class Model(BaseModel):
    """camelCase on the wire (Kubernetes style), snake_case in Python; unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class DeletionPolicy(enum.StrEnum):
    RETAIN = "Retain"
    DELETE = "Delete"


class ConfigMapKeyRef(Model):
    name: KubeName = Field(description="Name of a ConfigMap in the stack's namespace.")
    key: str = Field(min_length=1, description="Key in the ConfigMap.")


class AdminSecretRef(Model):
    name: KubeName = Field(description="Secret holding the admin credentials.")
    username_key: str = Field("username", min_length=1)
    password_key: str = Field("password", min_length=1)


class Resources(Model):
    """Container resources, as in a Pod spec."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


BackupName = Annotated[str, Field(pattern=r"^(latest|[0-9]{8}T[0-9]{6}Z)$")]
StorageSize = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$")]


class RestoreFrom(Model):
    """A backup of spec.backup's CronJob: the claim holding it and its name (or the newest)."""

    claim_name: KubeName = Field(description="PersistentVolumeClaim of the backups (e.g. <old stack>-backups).")
    backup: BackupName = Field("latest", description="A backup's name (YYYYMMDDTHHMMSSZ) or latest.")


class BackupVolume(Model):
    """Where backups go: an existing claim, or one the operator creates (and keeps when the stack goes)."""

    claim_name: KubeName | None = Field(None, description="An existing PersistentVolumeClaim.")
    storage_class_name: str | None = Field(None, description="For the claim the operator creates.")
    size: StorageSize = Field("5Gi", description="Size of the claim the operator creates.")


class BackupSpec(Model):
    """A CronJob dumps the stack's roles and databases to the volume, one directory per backup."""

    schedule: str = Field(
        "0 2 * * *",
        pattern=r"^(@(hourly|daily|weekly|monthly|yearly)|\S+( \S+){4})$",
        description="Cron schedule (UTC).",
    )
    retention: int = Field(7, ge=1, le=1000, description="Backups kept; older ones are removed.")
    volume: BackupVolume = Field(default_factory=BackupVolume)


class ManagedPostgres(Model):
    """The operator runs PostgreSQL as a StatefulSet; pgmq is installed as an extension or from SQL."""

    image: str = Field("singularity-stack-postgres:0.1.0", min_length=1)
    storage: str = Field("1Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$", description="PVC size.")
    storage_class_name: str | None = None
    resources: Resources = Field(default_factory=Resources)
    restore_from: RestoreFrom | None = Field(
        None, description="Bootstrap a new stack from a backup: restored into the fresh server before provisioning."
    )


class ExternalPostgres(Model):
    """An existing PostgreSQL server; the admin role must be able to create roles and databases."""

    host: str = Field(min_length=1)
    port: int = Field(5432, ge=1, le=65535)
    database: str = Field("postgres", min_length=1, description="Database the admin connects to.")
    admin_secret: AdminSecretRef
    ssl_mode: str = Field("prefer", pattern=r"^(disable|allow|prefer|require|verify-ca|verify-full)$")


class PostgresSpec(Model):
    managed: ManagedPostgres | None = None
    external: ExternalPostgres | None = None


class ServiceSpec(Model):
    image: str | None = Field(None, description="Overrides spec.image for this service.")
    resources: Resources = Field(default_factory=Resources)


class SingularitySpec(ServiceSpec):
    replicas: int = Field(1, ge=1, le=MAX_INSTANCES, description="Singularity instances, each with its own database.")


MAX_SERVICE_REPLICAS = 20


class Autoscale(Model):
    """Replicas that follow the service's queue (operator/singularity_operator/autoscale.py)."""

    min_replicas: int = Field(1, ge=1, le=MAX_SERVICE_REPLICAS)
    max_replicas: int = Field(ge=1, le=MAX_SERVICE_REPLICAS)
    target_queue_depth: int = Field(
        ge=1, le=1_000_000, description="Requests waiting per replica: depth / this = replicas wanted."
    )
    target_oldest_age_seconds: int | None = Field(
        None, ge=1, description="One more replica while the oldest request waits longer than this."
    )
    stabilization_window_seconds: int = Field(
        120, ge=0, le=3600, description="Scale down only to the most any recommendation of this window asked."
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) is more than maxReplicas ({self.max_replicas})")
        return self


class ScalableService(ServiceSpec):
    """A service any number of pods can run at once, sharing its queues' work (Nexus, Genesis)."""

    replicas: int = Field(1, ge=1, le=MAX_SERVICE_REPLICAS, description="Pods sharing the service's queues.")
    autoscale: Autoscale | None = Field(
        None, description="Follow the backlog of the service's work queue instead of a fixed replicas."
    )

    def most_replicas(self) -> int:
        """The most pods this service may run: what the connection budget must admit."""
        return self.autoscale.max_replicas if self.autoscale else self.replicas


class NexusSpec(ScalableService):
    routing_config_map: ConfigMapKeyRef | None = Field(
        None, description="ConfigMap (name, key) with a routing YAML; the packaged default otherwise."
    )
    provider_keys_secret: KubeName | None = Field(
        None, description="Secret whose keys (ANTHROPIC_API_KEY, OPENAI_API_KEY, ...) become Nexus's environment."
    )


class SeccompType(enum.StrEnum):
    UNCONFINED = "Unconfined"
    LOCALHOST = "Localhost"


# A path below the kubelet's seccomp directory: no absolute path, no segment starting with "." (so no "..").
LOCALHOST_PROFILE_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"


class GenesisSeccomp(Model):
    """Genesis's container seccomp profile. bubblewrap creates user namespaces, which the runtime's default
    profile refuses: Unconfined (fails the baseline Pod Security Standard) or Localhost, the chart's
    files/genesis-bubblewrap-seccomp.json installed on the nodes (allowed by baseline and restricted)."""

    type: SeccompType = SeccompType.UNCONFINED
    localhost_profile: str | None = Field(
        None,
        max_length=4096,
        pattern=LOCALHOST_PROFILE_PATTERN,
        description="With type Localhost: the profile's path below the kubelet's seccomp directory.",
    )

    @model_validator(mode="after")
    def _profile_with_localhost(self) -> GenesisSeccomp:
        if (self.type == SeccompType.LOCALHOST) != (self.localhost_profile is not None):
            raise ValueError("seccompProfile: localhostProfile is set exactly when type is Localhost")
        return self


class GenesisSandbox(enum.StrEnum):
    BUBBLEWRAP = "bubblewrap"  # each job in bubblewrap inside Genesis's Pod (needs user namespaces)
    POD = "pod"  # each job in a Pod of its own, which passes the restricted Pod Security Standard


class GenesisSpec(ScalableService):
    max_concurrent_jobs: int = Field(2, ge=1, le=64)
    seccomp_profile: GenesisSeccomp = Field(default_factory=GenesisSeccomp)
    sandbox: GenesisSandbox = Field(
        GenesisSandbox.BUBBLEWRAP,
        description="bubblewrap: jobs in Genesis's Pod (seccompProfile applies); pod: each job in its own Pod.",
    )
    runtime_class_name: KubeName | None = Field(
        None, description="With sandbox pod: the job Pods' RuntimeClass (e.g. gVisor or Kata where installed)."
    )
    job_image: str | None = Field(
        None, min_length=1, description="With sandbox pod: the job Pods' image; unset: Genesis's own."
    )


class CentralCloudSpec(ServiceSpec):
    retention_days: int = Field(90, ge=1, le=3650, description="Archived messages older than this are pruned.")


class MessagingMode(enum.StrEnum):
    PGMQ = "pgmq"  # the shared queue only
    DUAL = "dual"  # the migration from NATS, phase 1: NATS requests served too
    CUTOVER = "cutover"  # phase 2: NATS requests refused on their reply subject


class PublishTo(enum.StrEnum):
    PGMQ = "pgmq"
    NATS = "nats"
    BOTH = "both"


class MessagingSpec(Model):
    """The migration from NATS: the stack beside the platform's nats-server (its users: nats_permissions.py)."""

    mode: MessagingMode = MessagingMode.PGMQ
    nats_url: str | None = Field(
        None,
        pattern=r"^(nats|tls)://[^\s/]+$",
        description="The nats-server, e.g. nats://nats.messaging:4222; unset: the natsSecret's url key.",
    )
    nats_secret: KubeName | None = Field(
        None,
        description="Secret of the NATS users' passwords, one key per service and instance "
        "(centralcloud, nexus, genesis, singularity_1, ...), and the url when natsUrl is unset.",
    )
    nats_port: int = Field(4222, ge=1, le=65535, description="The port the NetworkPolicies open, if natsUrl is unset.")
    singularity_publish_to: PublishTo = Field(PublishTo.PGMQ, description="Where instances publish, in dual.")

    @model_validator(mode="after")
    def _nats_needs(self) -> MessagingSpec:
        if self.mode is not MessagingMode.PGMQ and self.nats_secret is None:
            raise ValueError(f"messaging: mode {self.mode.value} needs natsSecret (and natsUrl, or its url key)")
        if self.singularity_publish_to is not PublishTo.PGMQ and self.mode is not MessagingMode.DUAL:
            raise ValueError("messaging: singularityPublishTo other than pgmq needs mode dual")
        return self

    def egress_port(self) -> int:
        """The nats-server's port, which the NetworkPolicies let the services reach."""
        hostport = (self.nats_url or "").split("://", 1)[-1].rsplit("@", 1)[-1]
        port = hostport.rsplit(":", 1)[1] if ":" in hostport and not hostport.endswith("]") else ""
        return int(port) if port.isdigit() else self.nats_port if self.nats_url is None else 4222


class Connections(Model):
    """How many connections each service may open, so that the PostgreSQL server can be sized to admit them."""

    service_pool_size: int = Field(
        budget.SERVICE_POOL_SIZE, ge=1, le=100, description="Each pool of Nexus, Genesis and CentralCloud."
    )
    instance_pool_size: int = Field(budget.INSTANCE_POOL_SIZE, ge=1, le=100, description="Each pool of an instance.")
    headroom: int = Field(
        budget.HEADROOM, ge=0, le=10_000, description="Connections kept free for the operator and maintenance."
    )

    def stack_budget(self, instances: int, replicas: dict[str, int] | None = None) -> budget.Budget:
        return budget.stack_budget(instances, self.pools(), self.headroom, replicas)

    def pools(self) -> budget.PoolSizes:
        return budget.PoolSizes(self.service_pool_size, self.instance_pool_size)


class StackSpec(Model):
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="The image every service runs from.")
    image_pull_policy: str = Field("IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$")
    postgres: PostgresSpec = Field(default_factory=lambda: PostgresSpec(managed=ManagedPostgres()))
    singularity: SingularitySpec = Field(default_factory=SingularitySpec)
    nexus: NexusSpec = Field(default_factory=NexusSpec)
    genesis: GenesisSpec = Field(default_factory=GenesisSpec)
    centralcloud: CentralCloudSpec = Field(default_factory=CentralCloudSpec)
    connections: Connections = Field(default_factory=Connections)
    deletion_policy: DeletionPolicy = Field(
        DeletionPolicy.RETAIN, description="Delete drops the stack's databases and roles with it; Retain keeps them."
    )
    backup: BackupSpec | None = Field(None, description="Scheduled backups of managed PostgreSQL.")
    messaging: MessagingSpec = Field(default_factory=MessagingSpec, description="The migration from NATS.")

    @model_validator(mode="after")
    def _one_postgres(self) -> StackSpec:
        if (self.postgres.managed is None) == (self.postgres.external is None):
            raise ValueError("postgres: set exactly one of managed and external")
        return self

    @model_validator(mode="after")
    def _backup_managed(self) -> StackSpec:
        if self.backup is not None and self.postgres.external is not None:
            raise ValueError("backup: only for managed PostgreSQL; with external, use the provider's backups")
        return self

    def connection_budget(self) -> budget.Budget:
        """What every pod of the stack may open at once (each Nexus and Genesis replica its own pools)."""
        replicas = {"nexus": self.nexus.most_replicas(), "genesis": self.genesis.most_replicas()}
        return self.connections.stack_budget(self.singularity.replicas, replicas)

    def image_of(self, service: ServiceSpec) -> str:
        return service.image or self.image


class Condition(Model):
    """A status condition, as the Kubernetes API conventions define it."""

    type: str
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class ServiceRollout(Model):
    image: str = Field(description="The image the service's Deployment runs.")
    last_migration: str | None = Field(None, description="The last migration its database records as applied.")


class BackupStatus(Model):
    claim_name: str | None = Field(None, description="The claim the backups are written to.")
    last_backup_succeeded: bool | None = Field(None, description="Whether the newest finished backup Job succeeded.")
    last_backup: str | None = Field(None, description="The newest successful backup's name.")
    completed_at: str | None = Field(None, description="When it completed.")
    size_bytes: int | None = Field(None, description="Its size.")
    job: str | None = Field(None, description="The newest finished backup Job.")
    message: str | None = Field(None, description="Why the newest finished backup Job failed.")
    restored: str | None = Field(None, description="The backup this stack was restored from.")


class ScalingStatus(Model):
    current_replicas: int
    desired_replicas: int
    reason: str


class StackStatus(Model):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    singularity_replicas: int | None = Field(None, description="Instances whose databases are provisioned.")
    pgmq: str | None = Field(None, description="pgmq version and how it was installed.")
    migrations: dict[str, list[str]] = Field(default_factory=dict, description="Applied migrations per database.")
    backup: BackupStatus | None = Field(None, description="spec.backup's newest backups; the restore, if any.")
    services: dict[str, ServiceRollout] = Field(
        default_factory=dict, description="Per service and instance: the image it runs and its last migration."
    )
    autoscale: dict[str, ScalingStatus] = Field(
        default_factory=dict, description="Per autoscaled service: its replicas now, those wanted and why."
    )


def parse_spec(spec: dict[str, Any]) -> StackSpec:
    """The spec of a SingularityStack object; raises pydantic.ValidationError naming the field."""
    return StackSpec.model_validate(spec)
