"""The migrations condition the rollout plan reports, from what each database records."""

from __future__ import annotations

from singularity_operator.rollout import Plan


def test_available_pods_with_no_migration_recorded_still_say_something() -> None:
    # An empty message made the stack's status patch invalid (422), so Ready was never written.
    verdict = Plan([], {}).verdict({"stack_nexus": [], "stack_genesis": []})
    assert verdict.ok is True and verdict.reason == "Applied"
    assert verdict.message == "no migration recorded by any database"


def test_the_last_migration_of_each_database_is_named() -> None:
    verdict = Plan([], {}).verdict({"stack_nexus": ["0001.a", "0002.b"], "stack_genesis": []})
    assert verdict.message == "stack_nexus: 0002.b"


def test_databases_awaiting_their_init_containers_are_named_and_unknown() -> None:
    verdict = Plan([], {}).verdict({"stack_singularity_1": []}, awaiting=["stack_singularity_1"])
    assert verdict.ok is None and verdict.reason == "AwaitingInitContainers"
    assert verdict.message.startswith("stack_singularity_1: no migration recorded yet")
