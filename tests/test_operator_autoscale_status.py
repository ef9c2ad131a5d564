"""status.autoscale and the autoscaler's memory follow spec.*.autoscale, on a real API server.

The operator runs in-process (kopf's KopfRunner, as the chart's ServiceAccount) against a real kube-apiserver
and a real PostgreSQL with pgmq (an external server): removing a service's autoscale from the spec removes
its entry from status.autoscale, removing the last one removes status.autoscale itself (a merge patch keeps
what it is not told to drop), and neither writes anything on the ticks after; the recommendations the
operator keeps for the scale-down window go with the autoscale rule and with the stack. The status patch
itself (handlers.status_patch) is checked as a pure function for every top-level key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner
from test_operator_kube import (  # noqa: F401 (fixtures)
    Stacks,
    cluster,
    external,
    namespace,
    operator_kubeconfig,
    wait_for,
    writes_while_reconciling,
)

from singularity_operator import handlers
from singularity_operator.autoscale import FORGET_AFTER_S, ScaleMemory
from singularity_operator.config import OperatorConfig
from singularity_operator.handlers import status_patch
from singularity_stack.postgres.cluster import free_port

RULE = {"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 5, "stabilizationWindowSeconds": 60}


# -- pure ----------------------------------------------------------------------------------------------------


def test_a_key_the_outcome_holds_as_none_is_sent_as_null_when_the_status_has_it():
    current = {"observedGeneration": 2, "autoscale": {"genesis": {"desiredReplicas": 2}}, "backup": {"last": "x"}}
    assert status_patch(current, {"observedGeneration": 2, "autoscale": None}) == {
        "observedGeneration": 2,
        "autoscale": None,
    }
    # any top-level key: status.backup once spec.backup is gone, likewise
    assert status_patch(current, {"observedGeneration": 2, "backup": None}) == {"observedGeneration": 2, "backup": None}


def test_a_key_none_that_the_status_does_not_have_writes_nothing():
    assert status_patch({"observedGeneration": 2}, {"observedGeneration": 2, "autoscale": None}) is None
    # something else changed: the patch carries only that
    assert status_patch({"observedGeneration": 2}, {"observedGeneration": 3, "autoscale": None}) == {
        "observedGeneration": 3
    }


def test_keys_an_outcome_does_not_name_are_left_alone():
    """An outcome that stopped early (PostgreSQL unreachable) names conditions only: the rest stays."""
    current = {"observedGeneration": 2, "migrations": {"db": ["0001"]}, "autoscale": {"genesis": {}}}
    assert status_patch(current, {"observedGeneration": 2}) is None


def test_entries_gone_from_a_map_are_sent_as_null():
    current = {"autoscale": {"genesis": {"desiredReplicas": 2}, "nexus": {"desiredReplicas": 1}}}
    patch = status_patch(current, {"autoscale": {"nexus": {"desiredReplicas": 1}}})
    assert patch == {"autoscale": {"genesis": None, "nexus": {"desiredReplicas": 1}}}


def test_the_memory_forgets_samples_older_than_the_longest_window_the_crd_allows():
    from singularity_operator import api

    [bound] = [m.le for m in api.Autoscale.model_fields["stabilization_window_seconds"].metadata if hasattr(m, "le")]
    assert bound == FORGET_AFTER_S
    now = [0.0]
    memory = ScaleMemory(clock=lambda: now[0])
    memory.decide(("ns/gone", "genesis"), 1, 3, "burst", 60)
    now[0] = FORGET_AFTER_S
    memory.decide(("ns/live", "genesis"), 1, 1, "idle", 60)
    assert memory.known() == {("ns/gone", "genesis"), ("ns/live", "genesis")}  # not older than the horizon yet
    now[0] = FORGET_AFTER_S + 1
    memory.decide(("ns/live", "genesis"), 1, 1, "idle", 60)
    assert memory.known() == {("ns/live", "genesis")}


def test_the_memory_forgets_one_service_or_a_whole_stack():
    memory = ScaleMemory()
    for key in (("a/s", "genesis"), ("a/s", "nexus"), ("a/other", "genesis")):
        memory.decide(key, 1, 1, "idle", 60)
    memory.forget("a/s", "genesis")
    assert memory.known() == {("a/s", "nexus"), ("a/other", "genesis")}
    memory.forget("a/s")
    assert memory.known() == {("a/other", "genesis")}


# -- the operator, on a real API server ----------------------------------------------------------------------


@pytest.fixture
def run_operator(cluster) -> Callable[[], contextlib.AbstractContextManager[handlers.StackHandlers]]:  # noqa: F811
    plane, api_client = cluster
    kubeconfig = operator_kubeconfig(plane, api_client)
    liveness = free_port()

    @contextlib.contextmanager
    def running() -> Iterator[handlers.StackHandlers]:
        config = OperatorConfig(kubeconfig=kubeconfig, health_interval_seconds=2, metrics_port=0)
        mine = handlers.StackHandlers(config)
        args = ["run", "--standalone", "--all-namespaces", f"--liveness=http://127.0.0.1:{liveness}/healthz"]
        with KopfRunner(args, timeout=60, registry=handlers.register(config, handlers=mine)) as runner:
            yield mine
        assert runner.exception is None, runner.output

    return running


def status_writes(found: list[dict[str, Any]], stack: str) -> list[str]:
    """The writes to `stack`'s status (kopf's own annotations on the object are not the operator's status)."""
    return [
        f"{w['verb']} {w['requestURI']}"
        for w in found
        if w["objectRef"].get("resource") == "singularitystacks"
        and w["objectRef"].get("name") == stack
        and w["objectRef"].get("subresource") == "status"
    ]


def test_removing_autoscale_clears_its_status_and_memory_and_deleting_the_stack_forgets_it(
    cluster,  # noqa: F811
    run_operator,
    namespace,  # noqa: F811
    pg_cluster,
):
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    key = f"{namespace}/scaled"

    def autoscale() -> dict[str, Any] | None:
        return (stacks.get("scaled").get("status") or {}).get("autoscale")

    with run_operator() as operator:
        stacks.create("scaled", external(pg_cluster, genesis={"autoscale": RULE}, nexus={"autoscale": RULE}))
        found = wait_for("status.autoscale of both", lambda: (autoscale() or {}).keys() == {"genesis", "nexus"})
        assert found
        assert operator._scale_memory.known() == {(key, "genesis"), (key, "nexus")}

        stacks.patch_spec("scaled", {"genesis": {"autoscale": None}})
        wait_for("status.autoscale of nexus alone", lambda: (autoscale() or {}).keys() == {"nexus"})
        assert operator._scale_memory.known() == {(key, "nexus")}

        stacks.patch_spec("scaled", {"nexus": {"autoscale": None}})
        wait_for("no status.autoscale", lambda: "autoscale" not in (stacks.get("scaled").get("status") or {}))
        assert (key, "nexus") not in operator._scale_memory.known()
        # the rest of the status is the operator's as before
        status = stacks.get("scaled")["status"]
        assert status["observedGeneration"] == 3 and status["migrations"] and status["services"]
        # and the ticks after write nothing: the key the outcome holds as None is not sent again
        assert status_writes(writes_while_reconciling(plane, 3), "scaled") == []

        stacks.patch_spec("scaled", {"genesis": {"autoscale": RULE}})
        wait_for("status.autoscale of genesis again", lambda: (autoscale() or {}).keys() == {"genesis"})
        assert operator._scale_memory.known() == {(key, "genesis")}
        stacks.delete("scaled")
        wait_for("the stack gone", lambda: not stacks.custom.list_namespaced_custom_object(
            "singularity.dev", "v1alpha1", namespace, "singularitystacks")["items"])  # fmt: skip
        assert not [k for k in operator._scale_memory.known() if k[0] == key]
