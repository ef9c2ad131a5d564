"""The stack's layout: names, queues and grants as pure data."""

from __future__ import annotations

import pytest

from singularity_stack.topology import Access, StackLayout, dead_letter_queue, instance_id, reply_queue

PGMQ_MAX_QUEUE_NAME = 47


def test_layout_names_and_queues():
    layout = StackLayout(2)
    assert layout.owners == ("centralcloud", "genesis", "nexus", "singularity_1", "singularity_2")
    assert "llm_results_singularity_2" in layout.work_queues
    assert "llm_results" not in layout.queues  # replies only ever go to an instance's own queue
    assert len(layout.queues) == 2 * (4 + 4 * 2)
    assert all(dead_letter_queue(q) in layout.queues for q in layout.work_queues)


def test_queue_names_fit_pgmq_even_for_the_largest_stack():
    layout = StackLayout(9999)
    assert max(len(q) for q in layout.queues) <= PGMQ_MAX_QUEUE_NAME


def test_prefix_applies_to_roles_and_databases_not_queues():
    layout = StackLayout(1, "team_a_")
    assert layout.role("nexus") == "team_a_nexus"
    assert layout.shared_queue_database == "team_a_shared_queue"
    assert "llm_requests" in layout.queues


def test_each_instance_consumes_only_its_own_replies():
    layout = StackLayout(3)
    consumed = {(g.role, g.queue) for g in layout.grants if g.access is Access.CONSUME}
    for i in (1, 2, 3):
        own = {q for (r, q) in consumed if r == f"singularity_{i}"}
        assert own == {
            reply_queue(k, f"singularity_{i}")
            for k in ("llm_results", "job_results", "approval_responses", "question_responses")
        }


@pytest.mark.parametrize("bad", [0, -1, 10000])
def test_instance_count_is_bounded(bad):
    with pytest.raises(ValueError, match="singularity instances must be"):
        StackLayout(bad)
    with pytest.raises(ValueError):
        instance_id(bad)


def test_reply_queue_refuses_request_kinds():
    with pytest.raises(ValueError, match="not a reply kind"):
        reply_queue("llm_requests", "singularity_1")
