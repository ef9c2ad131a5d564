"""The message contract: one pydantic model per queue of the design, plus the dead-letter record.

Every request carries a `request_id` that comes back on its reply, and `reply_to`, the
Singularity instance that must receive the reply. Every message has a schema version, a
creation time and an optional deadline. Validation errors name the offending field.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

SCHEMA_VERSION: Final = 1

InstanceId = Annotated[str, StringConstraints(pattern=r"^singularity_[1-9][0-9]{0,3}$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class InvalidMessage(ValueError):
    """A message that does not fit its queue's contract; `reason` names each bad field."""

    def __init__(self, queue: str, reason: str) -> None:
        super().__init__(f"invalid {queue} message: {reason}")
        self.queue = queue
        self.reason = reason


def describe_validation_error(error: ValidationError) -> str:
    """'messages: List should have at least 1 item; task_type: Field required' — short and field-first."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        field = ".".join(str(p) for p in item["loc"])
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def _now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Fields every message has."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    queue: ClassVar[str]

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: uuid.UUID
    created_at: AwareDatetime = Field(default_factory=_now)
    deadline: AwareDatetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.deadline is not None and self.deadline <= (now or _now())


class Request(Message):
    """Singularity → Nexus/Genesis. `reply_to` is the instance whose reply queue gets the answer."""

    request_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    reply_to: InstanceId
    agent_id: NonEmpty


class Reply(Message):
    """Nexus/Genesis/the browser → the Singularity instance named in the request's `reply_to`."""

    recipient: InstanceId


# -- requests ----------------------------------------------------------------------------------------


class Complexity(enum.StrEnum):
    SIMPLE = "simple"
    MEDIUM = "medium"
    COMPLEX = "complex"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str


class LlmRequest(Request):
    queue: ClassVar[str] = "llm_requests"
    task_type: NonEmpty
    complexity: Complexity | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class AnsweredQuestion(BaseModel):
    """A question the task asked a human before it asked for approval, and the answer it went on with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    question: NonEmpty
    answer: NonEmpty
    answered_by: str = ""


class ApprovalRequest(Request):
    queue: ClassVar[str] = "approval_requests"
    file_path: NonEmpty
    diff: str
    description: str = ""
    # What the reviewer should know the change was built on (shown on the approval card).
    answered: list[AnsweredQuestion] = Field(default_factory=list)


class QuestionRequest(Request):
    queue: ClassVar[str] = "question_requests"
    question: NonEmpty
    context: str = ""


class Language(enum.StrEnum):
    """The languages a task can be written in and Genesis runs: the one list of them in the project."""

    PYTHON = "python"
    JAVASCRIPT = "javascript"
    BASH = "bash"
    ELIXIR = "elixir"

    @property
    def source_name(self) -> str:
        """The program's file name: what Singularity proposes and Genesis runs (main.py, main.js, …)."""
        return SOURCE_NAMES[self]


SOURCE_NAMES: Mapping[Language, str] = MappingProxyType(
    {
        Language.PYTHON: "main.py",
        Language.JAVASCRIPT: "main.js",
        Language.BASH: "main.sh",
        Language.ELIXIR: "main.exs",
    }
)


class JobRequest(Request):
    queue: ClassVar[str] = "job_requests"
    code: str
    language: Language
    run: bool = True  # False: validate (syntax + lint) only


# -- replies -----------------------------------------------------------------------------------------


class LlmResult(Reply):
    queue: ClassVar[str] = "llm_results"
    result: str | None = None
    model: str | None = None
    complexity: Complexity | None = None
    cost_usd: Annotated[float, Field(ge=0)] = 0.0
    prompt_tokens: Annotated[int, Field(ge=0)] = 0
    completion_tokens: Annotated[int, Field(ge=0)] = 0
    error: str | None = None

    @model_validator(mode="after")
    def _result_or_error(self) -> LlmResult:
        if (self.result is None) == (self.error is None):
            raise ValueError("exactly one of result and error must be set")
        return self


class JobStatus(enum.StrEnum):
    OK = "ok"
    SYNTAX_ERROR = "syntax_error"
    LINT = "lint"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_TRUNCATED = "output_truncated"
    ERROR = "error"  # Genesis itself could not run the job


class JobResult(Reply):
    """Genesis's verdict: `output` is stdout, `error` stderr (or why the job could not run)."""

    queue: ClassVar[str] = "job_results"
    status: JobStatus
    output: str = ""
    error: str | None = None
    exit_code: int | None = None
    lint: list[str] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)


class ApprovalResponse(Reply):
    queue: ClassVar[str] = "approval_responses"
    approved: bool
    reason: str = ""
    decided_by: str = ""

    @model_validator(mode="after")
    def _rejection_has_reason(self) -> ApprovalResponse:
        if not self.approved and not self.reason.strip():
            raise ValueError("a rejection needs a reason")
        return self


class QuestionResponse(Reply):
    queue: ClassVar[str] = "question_responses"
    response: NonEmpty
    answered_by: str = ""


REQUESTS: dict[str, type[Request]] = {m.queue: m for m in (LlmRequest, ApprovalRequest, QuestionRequest, JobRequest)}
REPLIES: dict[str, type[Reply]] = {m.queue: m for m in (LlmResult, JobResult, ApprovalResponse, QuestionResponse)}
MODELS: dict[str, type[Message]] = {**REQUESTS, **REPLIES}


def reply_fields(request: Request) -> dict[str, Any]:
    """The fields a reply copies from its request."""
    return {"request_id": request.request_id, "recipient": request.reply_to}


def build(kind: str, data: Any) -> Message:
    """Validate `data` as a message of queue kind `kind`, or raise InvalidMessage naming the fields."""
    model = MODELS.get(kind)
    if model is None:
        raise InvalidMessage(kind, f"unknown queue kind {kind!r}; known: {', '.join(sorted(MODELS))}")
    if not isinstance(data, dict):
        raise InvalidMessage(kind, f"(message): expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidMessage(kind, describe_validation_error(error)) from error


# forged_sender: a request whose sender PostgreSQL does not vouch for as its `reply_to`.
DeadLetterReason = Literal["invalid", "forged_sender", "permanent", "failed", "expired", "attempts_exhausted"]


class DeadLetter(BaseModel):
    """What a dead-letter queue holds: the original message untouched, and why it ended there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_queue: str
    source_msg_id: int
    attempts: int
    reason: DeadLetterReason
    error: str
    message: Any
    headers: dict[str, Any] | None = None
    enqueued_at: datetime | None = None
    dead_lettered_at: AwareDatetime = Field(default_factory=_now)
