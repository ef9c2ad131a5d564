"""The operator's settings: one object, loaded once when `singularity-stack operator` starts.

Read from the environment (the names below), with the command's `--liveness-port` and
`--metrics-port` flags taking precedence. Nothing in the operator reads the environment itself:
`handlers.register(config)` hands this object to every handler. Which namespaces are watched is
the command's `--namespace` / `--all-namespaces`, not a setting.

| variable                  | default | meaning                                                            |
|---------------------------|---------|--------------------------------------------------------------------|
| `KUBECONFIG`              | unset   | a kubeconfig file to connect with; unset: the Pod's ServiceAccount |
| `LOG_LEVEL`               | INFO    | DEBUG, INFO, WARNING, ERROR or CRITICAL                            |
| `HEALTH_INTERVAL_SECONDS` | 30      | how often each stack's health and drift are re-checked (> 0)       |
| `OPERATOR_METRICS_PORT`   | 9090    | Prometheus /metrics port; 0: no metrics endpoint                   |
| `OPERATOR_LIVENESS_PORT`  | 8080    | kopf's liveness endpoint (/healthz) port                           |
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, FilePath, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class OperatorConfigError(ValueError):
    """Settings that do not validate; the message is one line naming each variable and what is wrong."""


class OperatorConfig(BaseSettings):
    """What the operator is configured with (module docstring: the variables and their defaults)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    kubeconfig: FilePath | None = Field(None, validation_alias=AliasChoices("KUBECONFIG", "kubeconfig"))
    log_level: LogLevel = Field("INFO", validation_alias=AliasChoices("LOG_LEVEL", "log_level"))
    health_interval_seconds: float = Field(
        30.0, gt=0, validation_alias=AliasChoices("HEALTH_INTERVAL_SECONDS", "health_interval_seconds")
    )
    metrics_port: int = Field(
        9090, ge=0, le=65535, validation_alias=AliasChoices("OPERATOR_METRICS_PORT", "metrics_port")
    )
    liveness_port: int = Field(
        8080, ge=1, le=65535, validation_alias=AliasChoices("OPERATOR_LIVENESS_PORT", "liveness_port")
    )

    @field_validator("kubeconfig", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @classmethod
    def load(cls, **overrides: Any) -> OperatorConfig:
        """The settings from the environment, `overrides` (the command's flags; None: not given) winning."""
        given = {name: value for name, value in overrides.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as error:
            raise OperatorConfigError(f"operator settings: {describe(error)}") from None


def _variable(field: str) -> str:
    """The environment variable a field is read from: its first alias."""
    info = OperatorConfig.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field


def describe(error: ValidationError) -> str:
    """'HEALTH_INTERVAL_SECONDS: Input should be greater than 0 (got '0')': one line, by variable name."""
    parts = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        variable = _variable(name) if name in OperatorConfig.model_fields else name
        got = f" (got {item['input']!r})" if isinstance(item.get("input"), str | int | float) else ""
        parts.append(f"{variable}: {item['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(parts)
