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


class ManagedPostgres(Model):
    """The operator runs PostgreSQL as a StatefulSet; pgmq is installed as an extension or from SQL."""

    image: str = Field("singularity-stack-postgres:0.1.0", min_length=1)
    storage: str = Field("1Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$", description="PVC size.")
    storage_class_name: str | None = None
    resources: Resources = Field(default_factory=Resources)


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


class NexusSpec(ServiceSpec):
    routing_config_map: ConfigMapKeyRef | None = Field(
        None, description="ConfigMap (name, key) with a routing YAML; the packaged default otherwise."
    )
    provider_keys_secret: KubeName | None = Field(
        None, description="Secret whose keys (ANTHROPIC_API_KEY, OPENAI_API_KEY, ...) become Nexus's environment."
    )


class GenesisSpec(ServiceSpec):
    max_concurrent_jobs: int = Field(2, ge=1, le=64)


class CentralCloudSpec(ServiceSpec):
    retention_days: int = Field(90, ge=1, le=3650, description="Archived messages older than this are pruned.")


class Connections(Model):
    """How many connections each service may open, so that the PostgreSQL server can be sized to admit them."""

    service_pool_size: int = Field(
        budget.SERVICE_POOL_SIZE, ge=1, le=100, description="Each pool of Nexus, Genesis and CentralCloud."
    )
    instance_pool_size: int = Field(budget.INSTANCE_POOL_SIZE, ge=1, le=100, description="Each pool of an instance.")
    headroom: int = Field(
        budget.HEADROOM, ge=0, le=10_000, description="Connections kept free for the operator and maintenance."
    )

    def stack_budget(self, instances: int) -> budget.Budget:
        return budget.stack_budget(instances, self.pools(), self.headroom)

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

    @model_validator(mode="after")
    def _one_postgres(self) -> StackSpec:
        if (self.postgres.managed is None) == (self.postgres.external is None):
            raise ValueError("postgres: set exactly one of managed and external")
        return self

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


class StackStatus(Model):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    singularity_replicas: int | None = Field(None, description="Instances whose databases are provisioned.")
    pgmq: str | None = Field(None, description="pgmq version and how it was installed.")
    migrations: dict[str, list[str]] = Field(default_factory=dict, description="Applied migrations per database.")


def parse_spec(spec: dict[str, Any]) -> StackSpec:
    """The spec of a SingularityStack object; raises pydantic.ValidationError naming the field."""
    return StackSpec.model_validate(spec)
