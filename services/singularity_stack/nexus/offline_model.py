"""The offline model: a deterministic stand-in LLM, so the stack runs end to end with no provider key.

It is a litellm `CustomLLM` registered as provider "offline" (model string "offline/deterministic"), so it
goes through the same Router, retries, fallbacks and cost accounting as a real provider. Its replies say
they come from an offline stand-in: the text starts with "[offline stand-in]", the response's model is
"offline/deterministic" and its system_fingerprint is "offline-stand-in".

- Code-producing task types (CODE_TASK_TYPES: code_generation, coder, refactoring) get a short explanation
  and exactly one fenced block with a small valid program in the language the prompt asks for (python,
  javascript, bash or elixir: Singularity's "Language: <lang>." system message, see `requested_language`),
  which does what the task's keywords ask (a greeting, FizzBuzz, primes, Fibonacci, the alphabet) or else
  prints which task it stands in for; it passes Genesis's syntax checks and linters and exits 0, so the
  Singularity workflow can extract it and have Genesis run it. `pseudocode` is not among them: its answer
  is meant to be read, not executed.
- Every other task type gets one plain sentence quoting the task type and the start of the last user message.
- A last user message containing FAIL_MARKER ("[offline:fail]") makes the call fail (a 503), so retries and
  fallbacks can be tested without a network.

Token counts are word counts, so `litellm.completion_cost` prices a reply deterministically; the default
routing prices the offline model at 0 per token, because it is free.
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

from singularity_stack.contract import Language
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
        return _code_reply(task, requested_language(messages), requested_task(messages), digest)
    return (
        f"[offline stand-in] Deterministic answer for task_type {task!r}: no LLM provider was available for this "
        f'request, so this is a placeholder. The request begins: "{request}" (prompt {digest}).'
    )


# -- which language, which task --------------------------------------------------------------------------

# Singularity's workflow says "Language: <lang>." in its system message and "Write the complete <lang>
# program ..." / "This <lang> code fails ..." in the user message; other callers may only name it.
_LANGUAGE_LINE = re.compile(r"\blanguage:\s*([a-z0-9_+-]+)", re.IGNORECASE)
_LANGUAGE_WORD = re.compile(r"\b(python3?|javascript|node|bash|elixir)\b", re.IGNORECASE)
_LANGUAGE_ALIASES = {
    "python3": Language.PYTHON,
    "js": Language.JAVASCRIPT,
    "node": Language.JAVASCRIPT,
    "sh": Language.BASH,
}
# "Task: ..." in the code prompt, and "# Task: ..." / "// Task: ..." in an offline program quoted by a fix prompt.
_TASK_LINE = re.compile(r"^[ \t]*(?:#|//)?[ \t]*Task:[ \t]*(\S.*)$", re.MULTILINE)
_CLARIFICATION_LINE = re.compile(r"^[ \t]*Clarification from a human:[ \t]*(\S.*)$", re.MULTILINE)


def _language_named(name: str) -> Language | None:
    key = name.strip().lower()
    if key in _LANGUAGE_ALIASES:
        return _LANGUAGE_ALIASES[key]
    try:
        return Language(key)
    except ValueError:
        return None


def requested_language(messages: Messages) -> Language:
    """The language the prompt asks for: a "Language: X" line in any message, else the first language the last
    user message names, else python."""
    for message in messages:
        for match in _LANGUAGE_LINE.finditer(message_text(message)):
            language = _language_named(match.group(1))
            if language is not None:
                return language
    for match in _LANGUAGE_WORD.finditer(last_user_text(messages)):
        language = _language_named(match.group(1))
        if language is not None:
            return language
    return Language.PYTHON


def requested_task(messages: Messages) -> str:
    """What the program should do: the "Task:" line of the last user message (with a human's clarification),
    else the whole last user message; one printable line of at most EXCERPT_LENGTH characters."""
    text = last_user_text(messages)
    task = _TASK_LINE.search(text)
    wanted = task.group(1) if task else text
    clarification = _CLARIFICATION_LINE.search(text)
    if clarification and clarification.group(1) not in wanted:
        wanted = f"{wanted} {clarification.group(1)}"
    return _excerpt(wanted)


# -- the programs --------------------------------------------------------------------------------------

# What a task asks for, by keywords (first match wins), and what the program then does. Anything else gets
# a program that says which task it stands in for.
_INTENTS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("fizzbuzz", re.compile(r"fizz\s*buzz", re.IGNORECASE), "prints FizzBuzz from 1 to 15"),
    ("primes", re.compile(r"\bprimes?\b", re.IGNORECASE), "prints the prime numbers below 50"),
    ("fibonacci", re.compile(r"fibonacci", re.IGNORECASE), "prints the first 10 Fibonacci numbers"),
    ("alphabet", re.compile(r"\balphabet\b", re.IGNORECASE), "prints the alphabet"),
    ("greeting", re.compile(r"\b(greet\w*|hello|welcome)\b", re.IGNORECASE), "prints a greeting"),
)
GREETING = "Hello, world!"

_PROGRAMS: dict[str, dict[Language, str]] = {
    "greeting": {
        Language.PYTHON: 'def main() -> None:\n    print(GREETING)\n\n\nif __name__ == "__main__":\n    main()\n',
        Language.JAVASCRIPT: "function main() {\n  console.log(GREETING);\n}\n\nmain();\n",
        Language.BASH: "main() {\n  printf '%s\\n' GREETING\n}\n\nmain \"$@\"\n",
        Language.ELIXIR: "defmodule OfflineStandIn do\n  def main do\n    IO.puts(GREETING)\n  end\nend\n\n"
        "OfflineStandIn.main()\n",
    },
    "fizzbuzz": {
        Language.PYTHON: "def fizzbuzz(n: int) -> str:\n"
        '    if n % 15 == 0:\n        return "FizzBuzz"\n'
        '    if n % 3 == 0:\n        return "Fizz"\n'
        '    if n % 5 == 0:\n        return "Buzz"\n'
        "    return str(n)\n\n\n"
        "def main() -> None:\n    for n in range(1, 16):\n        print(fizzbuzz(n))\n\n\n"
        'if __name__ == "__main__":\n    main()\n',
        Language.JAVASCRIPT: "function fizzbuzz(n) {\n"
        '  if (n % 15 === 0) return "FizzBuzz";\n'
        '  if (n % 3 === 0) return "Fizz";\n'
        '  if (n % 5 === 0) return "Buzz";\n'
        "  return String(n);\n}\n\n"
        "for (let n = 1; n <= 15; n++) {\n  console.log(fizzbuzz(n));\n}\n",
        Language.BASH: "for ((n = 1; n <= 15; n++)); do\n"
        '  if ((n % 15 == 0)); then\n    echo "FizzBuzz"\n'
        '  elif ((n % 3 == 0)); then\n    echo "Fizz"\n'
        '  elif ((n % 5 == 0)); then\n    echo "Buzz"\n'
        '  else\n    echo "$n"\n  fi\ndone\n',
        Language.ELIXIR: "Enum.each(1..15, fn n ->\n  cond do\n"
        '    rem(n, 15) == 0 -> IO.puts("FizzBuzz")\n'
        '    rem(n, 3) == 0 -> IO.puts("Fizz")\n'
        '    rem(n, 5) == 0 -> IO.puts("Buzz")\n'
        "    true -> IO.puts(Integer.to_string(n))\n  end\nend)\n",
    },
    "primes": {
        Language.PYTHON: "def is_prime(n: int) -> bool:\n"
        "    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))\n\n\n"
        "def main() -> None:\n"
        '    print(" ".join(str(n) for n in range(50) if is_prime(n)))\n\n\n'
        'if __name__ == "__main__":\n    main()\n',
        Language.JAVASCRIPT: "function isPrime(n) {\n  if (n < 2) return false;\n"
        "  for (let d = 2; d * d <= n; d++) {\n    if (n % d === 0) return false;\n  }\n  return true;\n}\n\n"
        "const primes = [];\nfor (let n = 0; n < 50; n++) {\n  if (isPrime(n)) primes.push(n);\n}\n"
        'console.log(primes.join(" "));\n',
        Language.BASH: "primes=()\nfor ((n = 2; n < 50; n++)); do\n  prime=1\n"
        "  for ((d = 2; d * d <= n; d++)); do\n    if ((n % d == 0)); then\n      prime=0\n      break\n"
        '    fi\n  done\n  if ((prime)); then\n    primes+=("$n")\n  fi\ndone\n'
        'echo "${primes[*]}"\n',
        Language.ELIXIR: "2..49\n"
        "|> Enum.filter(fn n -> Enum.count(1..n, fn d -> rem(n, d) == 0 end) == 2 end)\n"
        '|> Enum.join(" ")\n|> IO.puts()\n',
    },
    "fibonacci": {
        Language.PYTHON: "def fibonacci(count: int) -> list[int]:\n    numbers = []\n    a, b = 0, 1\n"
        "    for _ in range(count):\n        numbers.append(a)\n        a, b = b, a + b\n    return numbers\n\n\n"
        'def main() -> None:\n    print(" ".join(str(n) for n in fibonacci(10)))\n\n\n'
        'if __name__ == "__main__":\n    main()\n',
        Language.JAVASCRIPT: "const numbers = [];\nlet a = 0;\nlet b = 1;\nfor (let i = 0; i < 10; i++) {\n"
        "  numbers.push(a);\n  [a, b] = [b, a + b];\n}\n"
        'console.log(numbers.join(" "));\n',
        Language.BASH: "numbers=()\na=0\nb=1\nfor ((i = 0; i < 10; i++)); do\n"
        '  numbers+=("$a")\n  next=$((a + b))\n  a=$b\n  b=$next\ndone\n'
        'echo "${numbers[*]}"\n',
        Language.ELIXIR: "{0, 1}\n"
        "|> Stream.unfold(fn {a, b} -> {a, {b, a + b}} end)\n"
        '|> Enum.take(10)\n|> Enum.join(" ")\n|> IO.puts()\n',
    },
    "alphabet": {
        Language.PYTHON: "import string\n\n\ndef main() -> None:\n    print(string.ascii_lowercase)\n\n\n"
        'if __name__ == "__main__":\n    main()\n',
        Language.JAVASCRIPT: "const letters = Array.from({ length: 26 }, (_, i) => String.fromCharCode(97 + i));\n"
        'console.log(letters.join(""));\n',
        Language.BASH: "letters=$(printf '%s' {a..z})\nprintf '%s\\n' \"$letters\"\n",
        Language.ELIXIR: "?a..?z\n|> Enum.to_list()\n|> List.to_string()\n|> IO.puts()\n",
    },
    "fallback": {
        Language.PYTHON: 'def main() -> None:\n    print(MESSAGE)\n\n\nif __name__ == "__main__":\n    main()\n',
        Language.JAVASCRIPT: "function main() {\n  console.log(MESSAGE);\n}\n\nmain();\n",
        Language.BASH: "main() {\n  printf '%s\\n' MESSAGE\n}\n\nmain \"$@\"\n",
        Language.ELIXIR: "defmodule OfflineStandIn do\n  def main do\n    IO.puts(MESSAGE)\n  end\nend\n\n"
        "OfflineStandIn.main()\n",
    },
}
_COMMENT = {Language.PYTHON: "#", Language.JAVASCRIPT: "//", Language.BASH: "#", Language.ELIXIR: "#"}
_SHEBANG = {Language.BASH: "#!/usr/bin/env bash"}


def fallback_message(task: str) -> str:
    """What the program for a task the offline model does not recognise prints."""
    return f"offline stand-in: no LLM provider was available to write a program for: {task}"


def string_literal(language: Language, text: str) -> str:
    """`text` as a string literal of `language` that means exactly `text` (no interpolation, no escapes)."""
    if language is Language.PYTHON:
        return repr(text)
    if language is Language.JAVASCRIPT:
        return json.dumps(text, ensure_ascii=True)
    if language is Language.BASH:
        # ANSI-C quoting: nothing in it expands, and shellcheck does not take a $ in it for a mistake (SC2016).
        return "$'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
    return f'"{escaped}"'


def offline_program(language: Language, task: str, digest: str) -> tuple[str, str]:
    """The offline program for `task` in `language`, and what it does, in words."""
    intent, does = next(
        ((name, does) for name, pattern, does in _INTENTS if pattern.search(task)),
        ("fallback", "prints which task it stands in for"),
    )
    body = (
        _PROGRAMS[intent][language]
        .replace("GREETING", string_literal(language, GREETING))
        .replace("MESSAGE", string_literal(language, fallback_message(task)))
    )
    comment = _COMMENT[language]
    header = [
        *([_SHEBANG[language]] if language in _SHEBANG else []),
        f"{comment} Offline stand-in program ({OFFLINE_MODEL}), not a real solution; prompt {digest}.",
        f"{comment} Task: {task}",
    ]
    return "\n".join(header) + "\n\n" + body, does


def _code_reply(task_type: str, language: Language, task: str, digest: str) -> str:
    program, does = offline_program(language, task, digest)
    return (
        f"[offline stand-in] Deterministic answer for task_type {task_type!r}: no LLM provider was available for "
        f"this request, so this is a placeholder, not a real solution. The {language} program below {does} "
        f"(prompt {digest}).\n\n"
        f"```{language}\n{program}```\n"
    )


def _excerpt(text: str) -> str:
    # One printable line, and no backticks: the excerpt is quoted inside a fenced block, which a ``` would end
    # early, and in a one-line comment of the program, which a line break would end.
    flat = "".join(ch for ch in re.sub(r"\s+", " ", text) if ch.isprintable()).strip().replace("`", "'")
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
