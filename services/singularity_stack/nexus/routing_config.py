"""The routing configuration: the models Nexus may call and, per task type and complexity, their order.

YAML shape (the packaged `default_routing.yaml` is the full example)::

    models:                 # litellm Router model_list entries, plus our `requires_env`
      - model_name: claude-opus
        litellm_params: {model: anthropic/claude-opus-5, api_key: os.environ/ANTHROPIC_API_KEY}
        requires_env: [ANTHROPIC_API_KEY]
      - model_name: offline
        litellm_params: {model: offline/deterministic}
        model_info: {input_cost_per_token: 0.0, output_cost_per_token: 0.0}   # free
    routes:                 # task type -> complexity -> ordered model names: primary first, then fallbacks
      architect: {complex: [claude-opus, offline]}
      default: {simple: [offline], medium: [offline], complex: [offline]}
    router: {num_retries: 2, cooldown_time: 5, allowed_fails: 3, timeout: 60, total_timeout: 240}

A task route may leave a complexity out; the `default` route, which must list all three, serves it.
A model is usable only when every variable in `requires_env`, and every `os.environ/NAME` reference in its
`litellm_params`, is set. Prices in `model_info` (`input_cost_per_token`, `output_cost_per_token`) override
litellm's price map for cost accounting. Errors name the offending field.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from singularity_stack.contract import Complexity, describe_validation_error
from singularity_stack.nexus.complexity import normalize_task_type

DEFAULT_ROUTE = "default"
DEFAULT_CONFIG_RESOURCE = "default_routing.yaml"
# litellm's convention for secrets in litellm_params: the value "os.environ/NAME" means "read NAME".
ENV_REFERENCE_PREFIX = "os.environ/"
PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token")

ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
TaskType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ModelChain = Annotated[tuple[ModelName, ...], Field(min_length=1)]


class RoutingConfigError(ValueError):
    """A routing config that cannot be used; `reason` names each bad field."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"invalid routing config {source}: {reason}")
        self.source = source
        self.reason = reason


class ModelSpec(BaseModel):
    """One entry of litellm's Router model_list, plus the environment it needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: ModelName
    litellm_params: dict[str, Any]
    model_info: dict[str, Any] = Field(default_factory=dict)
    requires_env: tuple[EnvName, ...] = ()

    @field_validator("litellm_params")
    @classmethod
    def _names_a_litellm_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        model = value.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("needs 'model', the litellm model string (e.g. anthropic/claude-opus-5)")
        return value

    @field_validator("model_info")
    @classmethod
    def _router_owns_id_and_prices_are_numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The router sets each deployment's id from its model_name, to tell which model answered a call.
        if "id" in value:
            raise ValueError("'id' is set by the router (from the model_name); remove it")
        for key in PRICE_KEYS:
            price = value.get(key)
            if price is not None and (isinstance(price, bool) or not isinstance(price, int | float) or price < 0):
                raise ValueError(f"{key} must be a number >= 0, got {price!r}")
        return value

    @property
    def provider_model(self) -> str:
        """The litellm model string, e.g. 'anthropic/claude-opus-5'."""
        return str(self.litellm_params["model"])

    @property
    def required_env(self) -> tuple[str, ...]:
        """`requires_env` plus every variable an `os.environ/NAME` parameter reads, in order, without repeats."""
        referenced = (
            value.removeprefix(ENV_REFERENCE_PREFIX)
            for value in self.litellm_params.values()
            if isinstance(value, str) and value.startswith(ENV_REFERENCE_PREFIX)
        )
        return tuple(dict.fromkeys((*self.requires_env, *referenced)))

    @property
    def cost_per_token(self) -> dict[str, float] | None:
        """The configured prices (a missing one is 0), or None to use litellm's price map."""
        if not any(key in self.model_info for key in PRICE_KEYS):
            return None
        return {key: float(self.model_info.get(key, 0.0)) for key in PRICE_KEYS}


class TaskRoute(BaseModel):
    """Per complexity, the ordered model names to try: the first is the primary, the rest its fallbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    simple: ModelChain | None = None
    medium: ModelChain | None = None
    complex: ModelChain | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_complexities(cls, data: Any) -> Any:
        # Say what the allowed keys are, rather than pydantic's bare "Extra inputs are not permitted".
        if isinstance(data, Mapping):
            unknown = [str(key) for key in data if key not in {c.value for c in Complexity}]
            if unknown:
                allowed = ", ".join(c.value for c in Complexity)
                raise ValueError(f"unknown complexity {', '.join(map(repr, unknown))}; expected one of {allowed}")
        return data

    def chain(self, complexity: Complexity) -> tuple[str, ...] | None:
        chain: tuple[str, ...] | None = getattr(self, complexity.value)
        return chain


class RouterSettings(BaseModel):
    """Passed to litellm's Router: retries per model, and when a failing model is rested."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_retries: Annotated[int, Field(ge=0)] = 2
    cooldown_time: Annotated[float, Field(ge=0)] = 5.0  # seconds a model rests after allowed_fails failures
    allowed_fails: Annotated[int, Field(ge=0)] = 3
    timeout: Annotated[float, Field(gt=0)] = 60.0  # seconds per provider call
    # Seconds for a whole request, retries and fallbacks included (None: no bound). Worst case without it is
    # timeout x (num_retries + 1) x route length, which can outlast a queue message's visibility timeout.
    total_timeout: Annotated[float, Field(gt=0)] | None = None


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: Annotated[tuple[ModelSpec, ...], Field(min_length=1)]
    routes: dict[TaskType, TaskRoute]
    router: RouterSettings = Field(default_factory=RouterSettings)

    @model_validator(mode="after")
    def _routes_are_complete_and_name_known_models(self) -> RoutingConfig:
        problems = [*self._duplicate_models(), *self._default_route_problems(), *self._route_model_problems()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _duplicate_models(self) -> list[str]:
        seen: set[str] = set()
        problems = []
        for index, model in enumerate(self.models):
            if model.model_name in seen:
                problems.append(f"models[{index}].model_name: {model.model_name!r} is defined twice")
            seen.add(model.model_name)
        return problems

    def _default_route_problems(self) -> list[str]:
        default = self.routes.get(DEFAULT_ROUTE)
        if default is None:
            return [f"routes.{DEFAULT_ROUTE}: required (it serves task types without a route of their own)"]
        return [
            f"routes.{DEFAULT_ROUTE}.{complexity.value}: required (the default route must list every complexity)"
            for complexity in Complexity
            if default.chain(complexity) is None
        ]

    def _route_model_problems(self) -> list[str]:
        known = {model.model_name for model in self.models}
        problems = []
        for task_type, route in self.routes.items():
            for complexity in Complexity:
                chain = route.chain(complexity) or ()
                field = f"routes.{task_type}.{complexity.value}"
                problems += [
                    f"{field}[{index}]: unknown model {name!r} (defined: {', '.join(sorted(known))})"
                    for index, name in enumerate(chain)
                    if name not in known
                ]
                problems += [
                    f"{field}: lists {name!r} twice" for name in sorted({n for n in chain if chain.count(n) > 1})
                ]
        return problems

    def model(self, name: str) -> ModelSpec:
        return next(model for model in self.models if model.model_name == name)

    def chain(self, task_type: str, complexity: Complexity) -> tuple[str, ...]:
        """The configured models for a request, before availability: its task route, else the default route."""
        route = self.routes.get(normalize_task_type(task_type))
        chain = route.chain(complexity) if route is not None else None
        if chain is None:
            chain = self.routes[DEFAULT_ROUTE].chain(complexity)
        assert chain is not None  # the validator made the default route list every complexity
        return chain


def parse_routing_config(data: str | Mapping[str, Any], source: str = "<config>") -> RoutingConfig:
    """Validate a routing config given as YAML text or as already-parsed data."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as error:
            raise RoutingConfigError(source, f"not valid YAML: {error}") from error
    if not isinstance(data, Mapping):
        raise RoutingConfigError(source, f"expected a mapping with 'models' and 'routes', got {type(data).__name__}")
    try:
        return RoutingConfig.model_validate(data)
    except ValidationError as error:
        raise RoutingConfigError(source, describe_validation_error(error)) from error


def load_routing_config(path: Path | None = None) -> RoutingConfig:
    """The routing config at `path`, or the packaged default when `path` is None."""
    if path is None:
        return default_routing_config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RoutingConfigError(str(path), f"cannot be read: {error}") from error
    return parse_routing_config(text, str(path))


@functools.cache
def default_routing_config() -> RoutingConfig:
    """The packaged default_routing.yaml (cached: it cannot change while the process runs)."""
    resource = resources.files("singularity_stack.nexus").joinpath(DEFAULT_CONFIG_RESOURCE)
    return parse_routing_config(resource.read_text(encoding="utf-8"), f"<packaged {DEFAULT_CONFIG_RESOURCE}>")
