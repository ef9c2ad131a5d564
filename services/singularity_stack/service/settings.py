"""Service settings, read from the environment (the design's variable names)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
