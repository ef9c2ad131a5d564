"""LlmRouter: answers an LLM request with the first model of its route that works.

The route is the config's ordered model list for (task type, complexity); models whose environment is
not set are skipped. One litellm Router holds every available model and does the retries, the cooldowns
of failing models and the fallbacks: each call names its route's first model as the primary and the rest,
in order, as that call's own fallbacks (litellm reads a per-call `fallbacks=[{primary: [next, ...]}]`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

# litellm fetches its price map from the internet at import unless told otherwise; Nexus must start offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
from litellm.router import Router
from litellm.types.router import AllowedFailsPolicy

from singularity_stack.contract import ChatMessage, Complexity
from singularity_stack.nexus.completion import Completion, ComplexitySource, NoModelAvailableError, RoutingError
from singularity_stack.nexus.complexity import Messages, classify_complexity
from singularity_stack.nexus.offline_model import register_offline_provider
from singularity_stack.nexus.routing_config import (
    ENV_REFERENCE_PREFIX,
    ModelSpec,
    RoutingConfig,
    load_routing_config,
)

log = logging.getLogger(__name__)

# The response header litellm's Router sets to the model group that answered; read when the id is missing.
MODEL_GROUP_HEADER = "x-litellm-model-group"
# Each deployment's id is this prefix + its model_name, so a response's model_id says which model answered.
# The prefix matters: litellm also files a deployment's model_info in its global price map under the id, and a
# bare model_name such as "gpt-4o" would land on the real model's entry.
DEPLOYMENT_ID_PREFIX = "nexus:"
# litellm cools down the only deployment of a model group (every model here is a group of its own, its
# fallbacks given per call) only for failure kinds a policy names: these, the provider's side of a failure.
# A bad request (the prompt's fault) never rests a model.
COOLED_DOWN_FAILURES = (
    "AuthenticationError",
    "TimeoutError",
    "RateLimitError",
    "InternalServerError",
    "ServiceUnavailableError",
    "BadGatewayError",
    "NotFoundError",
)


class LlmRouter:
    def __init__(self, config: RoutingConfig | None = None, env: Mapping[str, str] | None = None) -> None:
        """`env` (default os.environ, read once, here) decides which models are available and supplies their
        `os.environ/NAME` parameters, so what is available and what litellm is given always agree."""
        self.config = config if config is not None else load_routing_config()
        environment = os.environ if env is None else env
        self._available = {spec.model_name: spec for spec in self.config.models if _is_available(spec, environment)}
        unavailable = [spec.model_name for spec in self.config.models if spec.model_name not in self._available]
        log.info("LLM models available: %s; skipped (environment not set): %s", list(self._available), unavailable)
        register_offline_provider()
        settings = self.config.router
        self._router = Router(
            model_list=[_deployment(spec, environment) for spec in self._available.values()],
            num_retries=settings.num_retries,
            cooldown_time=settings.cooldown_time,
            allowed_fails=settings.allowed_fails,
            allowed_fails_policy=AllowedFailsPolicy(
                **{f"{kind}AllowedFails": settings.allowed_fails for kind in COOLED_DOWN_FAILURES}
            ),
            timeout=settings.timeout,
            # litellm stops after 5 fallbacks by default; a route may list more.
            max_fallbacks=max(1, _longest_route(self.config) - 1),
        )

    @property
    def available_models(self) -> tuple[str, ...]:
        return tuple(self._available)

    def route(self, task_type: str, complexity: Complexity) -> tuple[str, ...]:
        """The available models for a request, in the order they are tried."""
        return tuple(name for name in self.config.chain(task_type, complexity) if name in self._available)

    async def complete(self, task_type: str, messages: Messages, complexity: Complexity | None = None) -> Completion:
        """Answer `messages`; `complexity` None lets the local classifier choose it.

        Raises NoModelAvailableError when no model of the route is available, RoutingError when all failed.
        """
        source: ComplexitySource = "classifier" if complexity is None else "request"
        used = classify_complexity(task_type, messages) if complexity is None else Complexity(complexity)
        models = self.route(task_type, used)
        if not models:
            configured = ", ".join(self.config.chain(task_type, used))
            raise NoModelAvailableError(
                f"no model available for task_type {task_type!r} at complexity {used.value!r}: "
                f"its route ({configured}) lists only models whose environment is not set",
                task_type=task_type,
                complexity=used,
                models=models,
            )
        started = time.perf_counter()
        response = await self._call(task_type, used, models, messages)
        latency_ms = (time.perf_counter() - started) * 1000
        spec = self._available[_answered_by(response, models)]
        usage = getattr(response, "usage", None)
        return Completion(
            text=response.choices[0].message.content or "",
            model=spec.model_name,
            provider_model=spec.provider_model,
            complexity=used,
            complexity_source=source,
            cost_usd=_cost_usd(spec, response),
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            latency_ms=latency_ms,
        )

    async def _call(self, task_type: str, complexity: Complexity, models: tuple[str, ...], messages: Messages) -> Any:
        primary, fallbacks = models[0], list(models[1:])
        # The metadata is never sent to a provider; the offline model reads the task type from it.
        kwargs: dict[str, Any] = {"metadata": {"task_type": task_type, "complexity": complexity.value}}
        if fallbacks:
            kwargs["fallbacks"] = [{primary: fallbacks}]
        total_timeout = self.config.router.total_timeout
        deadline = asyncio.timeout(total_timeout)
        try:
            async with deadline:
                return await self._router.acompletion(model=primary, messages=[_as_dict(m) for m in messages], **kwargs)
        except Exception as error:  # litellm raises many provider-specific types; callers need one
            reason = f"no answer within total_timeout {total_timeout} s" if deadline.expired() else str(error)
            raise RoutingError(
                f"task_type {task_type!r} at complexity {complexity.value!r} failed on every model of its route "
                f"({', '.join(models)}): {reason}",
                task_type=task_type,
                complexity=complexity,
                models=models,
            ) from error


def _is_available(spec: ModelSpec, env: Mapping[str, str]) -> bool:
    # An empty variable counts as unset: an empty API key can only fail.
    return all(env.get(name) for name in spec.required_env)


def _deployment(spec: ModelSpec, env: Mapping[str, str]) -> dict[str, Any]:
    """The model as a litellm model_list entry, its `os.environ/NAME` parameters read from `env`."""
    params = {key: _resolve(value, env) for key, value in spec.litellm_params.items()}
    return {
        "model_name": spec.model_name,
        "litellm_params": params,
        "model_info": {**spec.model_info, "id": DEPLOYMENT_ID_PREFIX + spec.model_name},
    }


def _resolve(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str) and value.startswith(ENV_REFERENCE_PREFIX):
        return env[value.removeprefix(ENV_REFERENCE_PREFIX)]
    return value


def _longest_route(config: RoutingConfig) -> int:
    return max(len(route.chain(c) or ()) for route in config.routes.values() for c in Complexity)


def _as_dict(message: Mapping[str, Any] | ChatMessage) -> dict[str, Any]:
    return message.model_dump() if isinstance(message, ChatMessage) else dict(message)


def _answered_by(response: Any, models: tuple[str, ...]) -> str:
    hidden = getattr(response, "_hidden_params", None) or {}
    model_id = hidden.get("model_id")
    deployment = model_id.removeprefix(DEPLOYMENT_ID_PREFIX) if isinstance(model_id, str) else None
    candidates = (deployment, (hidden.get("additional_headers") or {}).get(MODEL_GROUP_HEADER))
    answered = next((name for name in candidates if name in models), None)
    if answered is None:
        log.warning("litellm did not say which model answered; assuming the primary %s", models[0])
        return models[0]
    return answered


def _cost_usd(spec: ModelSpec, response: Any) -> float:
    """The call's cost at the configured prices, else at litellm's price map; 0 for a model nobody priced."""
    try:
        cost = litellm.completion_cost(
            completion_response=response, model=spec.provider_model, custom_cost_per_token=spec.cost_per_token
        )
    except Exception as error:  # litellm raises when it has no price for the model; the answer is still good
        log.warning("no price for %s (%s); counting its cost as 0: %s", spec.model_name, spec.provider_model, error)
        return 0.0
    return float(cost)
