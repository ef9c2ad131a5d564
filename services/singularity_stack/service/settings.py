"""Service settings, read from the environment (the design's variable names)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from singularity_stack.service.body_limit import DEFAULT_MAX_BODY_BYTES

# What `up` gives every service; the operator sets ALLOWED_HOSTS to the Service's DNS names and the pod IP.
DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.1,::1"
# The migration from NATS (service/messaging.py): pgmq only; dual operation (phase 1); cutover (phase 2).
MessagingMode = Literal["pgmq", "dual", "cutover"]


class SettingsError(Exception):
    """A service's environment is missing or wrong: one line naming each variable at fault."""


class ServiceSettings(BaseSettings):
    """Settings every service reads. Each service extends this with its own."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    database_url: str = Field(validation_alias=AliasChoices("DATABASE_URL", "database_url"))
    shared_queue_url: str = Field(
        validation_alias=AliasChoices("SHARED_QUEUE_DB_URL", "SHARED_QUEUE_URL", "shared_queue_url")
    )
    host: str = Field("127.0.0.1", validation_alias=AliasChoices("HOST", "host"))
    port: int = Field(8000, validation_alias=AliasChoices("PORT", "port"))
    log_level: str = Field("INFO", validation_alias=AliasChoices("LOG_LEVEL", "log_level"))
    # How long a stopping service waits for in-flight messages before handing them back.
    shutdown_grace_seconds: float = Field(10.0, validation_alias=AliasChoices("SHUTDOWN_GRACE_SECONDS"))
    # Comma-separated host names the HTTP server answers to (any other Host header: 400).
    allowed_hosts: str = Field(DEFAULT_ALLOWED_HOSTS, validation_alias=AliasChoices("ALLOWED_HOSTS", "allowed_hosts"))
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1, validation_alias=AliasChoices("MAX_BODY_BYTES", "max_body_bytes")
    )
    # Connections in each of the service's two pools (its database, the shared queue); unset: the
    # default for its kind (provision/budget.py), which the operator's max_connections budget assumes.
    pool_size: int | None = Field(None, ge=1, le=100, validation_alias=AliasChoices("POOL_SIZE", "pool_size"))

    # The migration from NATS: which paths the service serves, and its own nats-server user's password.
    messaging_mode: MessagingMode = Field("pgmq", validation_alias=AliasChoices("MESSAGING_MODE", "messaging_mode"))
    nats_url: str = Field("", validation_alias=AliasChoices("NATS_URL", "nats_url"))
    nats_password: str = Field("", validation_alias=AliasChoices("NATS_PASSWORD", "nats_password"))
    # The stack's names (topology.StackLayout): NATS subjects carry them, so dual and cutover need them.
    singularity_instances: int = Field(1, ge=1, validation_alias=AliasChoices("SINGULARITY_INSTANCES"))
    stack_prefix: str = Field("", validation_alias=AliasChoices("STACK_PREFIX"))

    @model_validator(mode="after")
    def _nats_needs(self) -> ServiceSettings:
        if self.messaging_mode == "pgmq":
            return self
        missing = [
            name
            for name, value in (("NATS_URL", self.nats_url), ("NATS_PASSWORD", self.nats_password))
            if not value.strip()
        ]
        if "singularity_instances" not in self.model_fields_set:
            missing.append("SINGULARITY_INSTANCES")  # a wrong count would refuse instances' requests as forged
        if missing:
            raise ValueError(f"MESSAGING_MODE={self.messaging_mode} needs {', '.join(missing)}")
        return self

    def allowed_host_names(self) -> frozenset[str]:
        return frozenset(name.strip().lower().strip("[]") for name in self.allowed_hosts.split(",") if name.strip())
