"""The local complexity classifier: picks simple / medium / complex when a request names none.

Known task types keep the tiers of the original system. Anything else is scored from what the user
asked: words that signal design-level work push the score up, very short prompts push it down. The
classifier is pure and deterministic, so the same request always routes the same way and costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from singularity_stack.contract import ChatMessage, Complexity

# A conversation as the router and the offline model get it: dicts or the contract's messages.
Messages = Sequence[Mapping[str, Any] | ChatMessage]


def normalize_task_type(task_type: str) -> str:
    """'Code-Generation ' -> 'code_generation': agents spell task types loosely; routes and tiers use one form."""
    return re.sub(r"[\s-]+", "_", task_type.strip().lower())


def _tier(complexity: Complexity, *task_types: str) -> dict[str, Complexity]:
    return dict.fromkeys(task_types, complexity)


# The original system's tiers: the task type alone decides for these.
TASK_TIERS: Mapping[str, Complexity] = MappingProxyType(
    {
        **_tier(
            Complexity.COMPLEX, "architect", "code_generation", "refactoring", "code_analysis", "qa", "pattern_analyzer"
        ),
        **_tier(Complexity.MEDIUM, "coder", "planning", "decomposition", "pseudocode", "chat"),
        **_tier(Complexity.SIMPLE, "classifier", "parser", "simple_chat", "web_search"),
    }
)

# Word stems (matched as prefixes of words) that mark design-level or risky work, worth 2 points each...
COMPLEX_STEMS = (
    "architect",
    "design",
    "refactor",
    "secur",
    "distribut",
    "scalab",
    "concurren",
    "migrat",
    "microservice",
    "consensus",
    "fault",
    "performan",
    "optimi",
    "threat",
    "tradeoff",
    "trade-off",
    "infrastructur",
    "vulnerab",
)
# ...and stems of ordinary engineering work, worth 1 point each. Each stem counts once per request,
# so repeating a word cannot inflate the score.
MEDIUM_STEMS = (
    "implement",
    "function",
    "class",
    "debug",
    "bug",
    "test",
    "api",
    "algorithm",
    "plan",
    "explain",
    "compar",
    "module",
    "endpoint",
    "schema",
    "review",
    "analy",
)
# Word-count bands: (fewer than this many words, points).
LENGTH_POINTS = ((8, -2), (20, -1), (150, 0), (400, 1))
LONG_PROMPT_POINTS = 2
COMPLEX_THRESHOLD = 4
MEDIUM_THRESHOLD = 1

_WORD = re.compile(r"[a-z][a-z0-9_+-]*")


def classify_complexity(task_type: str, messages: Messages) -> Complexity:
    """The complexity of a request: its task type's tier when known, else the heuristic score."""
    tier = TASK_TIERS.get(normalize_task_type(task_type))
    if tier is not None:
        return tier
    return complexity_for_score(score(request_text(messages)))


def complexity_for_score(points: int) -> Complexity:
    if points >= COMPLEX_THRESHOLD:
        return Complexity.COMPLEX
    if points >= MEDIUM_THRESHOLD:
        return Complexity.MEDIUM
    return Complexity.SIMPLE


def score(text: str) -> int:
    """Keyword points plus length points for `text` (see the constants above)."""
    words = _WORD.findall(text.lower())
    return 2 * _stems_hit(COMPLEX_STEMS, words) + _stems_hit(MEDIUM_STEMS, words) + _length_points(len(words))


def _stems_hit(stems: Iterable[str], words: Sequence[str]) -> int:
    return sum(1 for stem in stems if any(word.startswith(stem) for word in words))


def _length_points(word_count: int) -> int:
    for limit, points in LENGTH_POINTS:
        if word_count < limit:
            return points
    return LONG_PROMPT_POINTS


def request_text(messages: Sequence[Mapping[str, Any] | ChatMessage]) -> str:
    """The text the user asked, joined. System prompts are the agent's boilerplate and assistant turns are the
    model's own words, so scoring them would rate the agent rather than the request; they count only when a
    request has no user message at all."""
    pairs = [(message_role(message), message_text(message)) for message in messages]
    user = [text for role, text in pairs if role == "user"]
    return "\n".join(user if user else [text for _, text in pairs])


def message_text(message: Mapping[str, Any] | ChatMessage) -> str:
    """A message's text, for plain string content and for OpenAI-style lists of content parts."""
    content = message.content if isinstance(message, ChatMessage) else message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def message_role(message: Mapping[str, Any] | ChatMessage) -> str:
    role = message.role if isinstance(message, ChatMessage) else message.get("role")
    return role if isinstance(role, str) else ""
