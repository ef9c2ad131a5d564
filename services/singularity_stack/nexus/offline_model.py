"""The offline model: a deterministic stand-in LLM, so the stack runs end to end with no provider key.

It is a litellm `CustomLLM` registered as provider "offline" (model string "offline/deterministic"), so it
goes through the same Router, retries, fallbacks and cost accounting as a real provider. Its replies say
they come from an offline stand-in: the text starts with "[offline stand-in]", the response's model is
"offline/deterministic" and its system_fingerprint is "offline-stand-in".

- Code-producing task types (CODE_TASK_TYPES: code_generation, coder, refactoring) get a short explanation
  and exactly one fenced python block: a small valid program that prints a stable digest of the prompt, so
  the Singularity workflow can extract it and have Genesis run it. `pseudocode` is not among them: its
  answer is meant to be read, not executed.
- Every other task type gets one plain sentence quoting the task type and the start of the last user message.
- A last user message containing FAIL_MARKER ("[offline:fail]") makes the call fail (a 503), so retries and
  fallbacks can be tested without a network.

Token counts are word counts, so `litellm.completion_cost` prices a reply deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# litellm fetches its price map from the internet at import unless told otherwise; Nexus must start offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx
import litellm
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler, HTTPHandler
from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.llms.custom_llm import CustomLLMItem
from litellm.types.utils import ModelResponse

from singularity_stack.nexus.complexity import Messages, message_role, message_text, normalize_task_type

OFFLINE_PROVIDER = "offline"
OFFLINE_MODEL = f"{OFFLINE_PROVIDER}/deterministic"
OFFLINE_FINGERPRINT = "offline-stand-in"
FAIL_MARKER = "[offline:fail]"
CODE_TASK_TYPES = frozenset({"code_generation", "coder", "refactoring"})
DEFAULT_TASK_TYPE = "chat"  # when a caller does not pass metadata={"task_type": ...}
DIGEST_LENGTH = 12
EXCERPT_LENGTH = 80


class OfflineModelError(CustomLLMError):
    """The failure FAIL_MARKER asks for; 503 so litellm treats it as a retryable provider outage."""

    def __init__(self, message: str) -> None:
        # CustomLLMError.__init__ is unannotated (a super() call, which untyped_calls_exclude cannot name)
        super().__init__(status_code=503, message=message)  # type: ignore[no-untyped-call]


def prompt_digest(messages: Messages) -> str:
    """A short, stable digest of the whole prompt (roles and texts)."""
    canonical = json.dumps(
        [[message_role(m), message_text(m)] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]


def last_user_text(messages: Messages) -> str:
    return next((message_text(m) for m in reversed(messages) if message_role(m) == "user"), "")


def offline_reply(task_type: str, messages: Messages) -> str:
    """The offline model's answer: a function of the task type and the messages only."""
    task = normalize_task_type(task_type) or DEFAULT_TASK_TYPE
    digest = prompt_digest(messages)
    request = _excerpt(last_user_text(messages))
    if task in CODE_TASK_TYPES:
        return _code_reply(task, request, digest)
    return (
        f"[offline stand-in] Deterministic answer for task_type {task!r}: no LLM provider was available for this "
        f'request, so this is a placeholder. The request begins: "{request}" (prompt {digest}).'
    )


def _code_reply(task: str, request: str, digest: str) -> str:
    # Every value reaches the program through repr(), so the program is valid Python whatever the prompt says.
    program = "\n".join(
        [
            f'"""Offline stand-in program ({OFFLINE_MODEL}) for prompt {digest}."""',
            "",
            f"TASK_TYPE = {task!r}",
            f"REQUEST = {request!r}",
            f"PROMPT_DIGEST = {digest!r}",
            "",
            "",
            "def main() -> None:",
            '    print(f"offline stand-in for {TASK_TYPE}: prompt {PROMPT_DIGEST}")',
            "",
            "",
            'if __name__ == "__main__":',
            "    main()",
        ]
    )
    return (
        f"[offline stand-in] Deterministic answer for task_type {task!r}: no LLM provider was available for this "
        f"request, so this is a placeholder, not a real solution. The program below prints the prompt digest "
        f"({digest}).\n\n"
        f"```python\n{program}\n```\n"
    )


def _excerpt(text: str) -> str:
    # One line, and no backticks: the excerpt is quoted inside a fenced block, which a ``` would end early.
    flat = re.sub(r"\s+", " ", text).strip().replace("`", "'")
    return flat if len(flat) <= EXCERPT_LENGTH else flat[: EXCERPT_LENGTH - 1] + "…"


def _word_count(texts: Sequence[str]) -> int:
    return max(1, sum(len(text.split()) for text in texts))


def offline_response(task_type: str, messages: Messages) -> ModelResponse:
    """The offline model's full litellm response, or OfflineModelError when the prompt asks for a failure."""
    if FAIL_MARKER in last_user_text(messages):
        raise OfflineModelError(f"offline stand-in failed on request ({FAIL_MARKER} in the last user message)")
    text = offline_reply(task_type, messages)
    prompt_tokens = _word_count([message_text(m) for m in messages])
    completion_tokens = _word_count([text])
    return ModelResponse(
        id=f"offline-{prompt_digest(messages)}",
        model=OFFLINE_MODEL,
        system_fingerprint=OFFLINE_FINGERPRINT,
        choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )


def _task_type(litellm_params: Mapping[str, Any] | None) -> str:
    """The task type the router put in the call's metadata (litellm hands metadata to custom providers)."""
    metadata = (litellm_params or {}).get("metadata") or {}
    task_type = metadata.get("task_type") if isinstance(metadata, Mapping) else None
    return task_type if isinstance(task_type, str) and task_type.strip() else DEFAULT_TASK_TYPE


class OfflineModel(CustomLLM):
    """litellm calls these with keyword arguments only (see litellm.main._complete_custom_providers); the
    signatures are CustomLLM's, of which the offline model reads the messages and the task type in
    `litellm_params`."""

    def completion(
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[Any, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[Any, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: Any = None,
        timeout: float | httpx.Timeout | None = None,
        client: HTTPHandler | None = None,
    ) -> ModelResponse:
        return offline_response(_task_type(litellm_params), messages)

    async def acompletion(
        self,
        model: str,
        messages: list[Any],
        api_base: str,
        custom_prompt_dict: dict[Any, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: Any,
        logging_obj: Any,
        optional_params: dict[Any, Any],
        acompletion: Any = None,
        litellm_params: Any = None,
        logger_fn: Any = None,
        headers: Any = None,
        timeout: float | httpx.Timeout | None = None,
        client: AsyncHTTPHandler | None = None,
    ) -> ModelResponse:
        return offline_response(_task_type(litellm_params), messages)


def register_offline_provider() -> None:
    """Make "offline/..." model strings reach OfflineModel; idempotent."""
    if not any(item.get("provider") == OFFLINE_PROVIDER for item in litellm.custom_provider_map):
        entry: CustomLLMItem = {"provider": OFFLINE_PROVIDER, "custom_handler": OfflineModel()}
        litellm.custom_provider_map = [*litellm.custom_provider_map, entry]
