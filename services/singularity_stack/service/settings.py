"""Service settings, read from the environment (the design's variable names)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from singularity_stack.service.body_limit import DEFAULT_MAX_BODY_BYTES

# What `up` gives every service; the operator sets ALLOWED_HOSTS to the Service's DNS names and the pod IP.
DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.1,::1"


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

    def allowed_host_names(self) -> frozenset[str]:
        return frozenset(name.strip().lower().strip("[]") for name in self.allowed_hosts.split(",") if name.strip())
