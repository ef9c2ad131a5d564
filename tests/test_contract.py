"""The message contract: valid messages round-trip; invalid ones are refused with the field named."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from singularity_stack import contract as c


def llm_request(**overrides) -> dict:
    data = {
        "reply_to": "singularity_2",
        "agent_id": "self-improving-agent",
        "task_type": "architect",
        "messages": [{"role": "user", "content": "design a cache"}],
    }
    return {**data, **overrides}


def test_every_queue_of_the_design_has_a_model():
    assert set(c.MODELS) == {
        "llm_requests", "approval_requests", "question_requests", "job_requests",
        "llm_results", "job_results", "approval_responses", "question_responses",
    }  # fmt: skip


def test_request_gets_id_timestamp_and_version_and_round_trips():
    request = c.build("llm_requests", llm_request())
    assert isinstance(request, c.LlmRequest)
    assert request.schema_version == 1
    assert isinstance(request.request_id, uuid.UUID)
    assert request.created_at.tzinfo is not None
    assert c.LlmRequest.model_validate_json(request.model_dump_json()) == request


def test_reply_carries_the_request_id_and_recipient():
    request = c.build(
        "job_requests", {"reply_to": "singularity_1", "agent_id": "a", "code": "print(1)", "language": "python"}
    )
    reply = c.JobResult(**c.reply_fields(request), status=c.JobStatus.OK, output="1\n")
    assert (reply.request_id, reply.recipient) == (request.request_id, "singularity_1")


@pytest.mark.parametrize(
    ("kind", "data", "field"),
    [
        ("llm_requests", llm_request(messages=[]), "messages"),
        ("llm_requests", {k: v for k, v in llm_request().items() if k != "task_type"}, "task_type"),
        ("llm_requests", llm_request(reply_to="singularity_0"), "reply_to"),
        ("llm_requests", llm_request(complexity="huge"), "complexity"),
        ("llm_requests", llm_request(surprise=1), "surprise"),
        ("job_requests", {"reply_to": "singularity_1", "agent_id": "a", "code": "x", "language": "cobol"}, "language"),
        ("approval_requests", {"reply_to": "singularity_1", "agent_id": "a", "file_path": "", "diff": ""}, "file_path"),
        (
            "question_responses",
            {"request_id": str(uuid.uuid4()), "recipient": "singularity_1", "response": ""},
            "response",
        ),
        ("llm_requests", llm_request(deadline="2026-01-01T00:00:00"), "deadline"),  # naive time: ambiguous
    ],
)
def test_invalid_message_names_the_field(kind, data, field):
    with pytest.raises(c.InvalidMessage) as raised:
        c.build(kind, data)
    assert raised.value.queue == kind
    assert raised.value.reason.startswith(field) or f"; {field}" in raised.value.reason
    assert field in str(raised.value)


def test_rejection_needs_a_reason_and_llm_result_needs_result_or_error():
    base = {"request_id": str(uuid.uuid4()), "recipient": "singularity_1"}
    with pytest.raises(c.InvalidMessage, match="a rejection needs a reason"):
        c.build("approval_responses", {**base, "approved": False})
    assert c.build("approval_responses", {**base, "approved": False, "reason": "unsafe"})
    with pytest.raises(c.InvalidMessage, match="exactly one of result and error"):
        c.build("llm_results", base)


def test_unknown_kind_and_non_object_are_refused():
    with pytest.raises(c.InvalidMessage, match="unknown queue kind 'nope'"):
        c.build("nope", {})
    with pytest.raises(c.InvalidMessage, match="expected a JSON object"):
        c.build("llm_requests", ["not", "an", "object"])


def test_deadline_expiry():
    past = datetime.now(UTC) - timedelta(seconds=1)
    assert c.build("llm_requests", llm_request(deadline=past.isoformat())).expired()
    assert not c.build("llm_requests", llm_request()).expired()


def test_the_contracts_languages_are_the_only_list_of_them():
    """Genesis runs, Singularity accepts and names files for exactly the contract's languages."""
    from sandbox_support import TOOLS

    from singularity_stack.genesis.languages import LANGUAGES, UnsupportedLanguage, get_language
    from singularity_stack.singularity.service import NewTask

    assert set(LANGUAGES) == set(c.Language) == set(c.SOURCE_NAMES) == set(TOOLS)
    assert all(lang.name is key and lang.source_name == key.source_name for key, lang in LANGUAGES.items())
    assert [lang.source_name for lang in c.Language] == ["main.py", "main.js", "main.sh", "main.exs"]
    assert get_language(" Node ").name is c.Language.JAVASCRIPT
    assert get_language("python").name is c.Language.PYTHON
    with pytest.raises(UnsupportedLanguage, match="'cobol'; supported: bash, elixir, javascript, python"):
        get_language("cobol")
    assert NewTask(description="x").language is c.Language.PYTHON
    assert NewTask.model_validate({"description": "x", "language": "elixir"}).language is c.Language.ELIXIR
    assert NewTask.model_json_schema()["$defs"]["Language"]["enum"] == [m.value for m in c.Language]
