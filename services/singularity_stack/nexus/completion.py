"""What answering an LLM request yields, without litellm: the service and its store import these at start-up,
while the router (and litellm, seconds to import) loads in the background."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from singularity_stack.contract import Complexity

ComplexitySource = Literal["request", "classifier"]


class RoutingError(RuntimeError):
    """A request Nexus could not answer: every model of its route failed after retries, or none was available."""

    def __init__(self, message: str, *, task_type: str, complexity: Complexity, models: tuple[str, ...]) -> None:
        super().__init__(message)
        self.message = message
        self.task_type = task_type
        self.complexity = complexity
        self.models = models  # the route's available models, in the order they were tried


class NoModelAvailableError(RoutingError):
    """Every model of the route needs an environment variable that is not set."""


class Completion(BaseModel):
    """One answered request: what was said, by which model, at what cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str
    model: str  # the config's model_name that answered (after any fallback)
    provider_model: str  # its litellm model string, e.g. "anthropic/claude-opus-5"
    complexity: Complexity
    complexity_source: ComplexitySource
    cost_usd: float = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    latency_ms: float = Field(ge=0)
