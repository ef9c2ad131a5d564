"""Stack names that would make invalid objects are refused whole, by the CRD or the operator, never mid-reconcile.

The rules (operator/singularity_operator/naming.py) are checked against a real API server: every object
for a name at the limit is accepted (server-side dry run), and a name one longer makes the API server
refuse one of them, so the limits are neither looser nor stricter than Kubernetes'.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from singularity_operator import api, crd, naming, objects
from singularity_operator.controller import StackController
from singularity_operator.kube import Kube

GROUP, VERSION, PLURAL = "singularity.dev", "v1alpha1", "singularitystacks"
LIMIT = naming.longest_object_name()


def test_the_issue_s_names_are_refused_with_the_reason_and_the_limit():
    assert LIMIT == 43  # "<name>-postgres" is the longest StatefulSet, and it may be 52
    cases = {
        "a" * 44: "StatefulSet",
        "a" * 50: "StatefulSet",
        "a" * 64: "label value",
        "team.stack": "DNS-1035",
        "1team": "DNS-1035",
    }
    for name, reason in cases.items():
        problem = naming.name_problem(name, "default", external=False)
        assert problem is not None and reason in problem, (name, problem)
        assert problem.startswith(f"metadata.name: {name!r} cannot be used") and "at most 43 characters" in problem
    assert naming.name_problem("a" * 43, "default", external=False) is None
    assert naming.name_problem("example", "default", external=False) is None


def test_on_an_external_server_the_namespace_counts_because_postgres_cuts_names_at_63_bytes():
    # default_<stack>_centralcloud_analytics: 8 + 32 + 23 = 63
    assert naming.name_problem("a" * 32, "default", external=True) is None
    long = naming.name_problem("a" * 33, "default", external=True)
    assert long is not None and "63 bytes" in long and "at most 32 characters" in long
    crowded = naming.name_problem("ab", "n" * 40, external=True)
    assert crowded is not None and crowded.startswith("metadata.namespace:")
    assert f"at most {naming.longest_namespace()} characters" in crowded
    # The same stack on its own managed server has no prefix: only the objects count.
    assert naming.name_problem("a" * 40, "n" * 40, external=False) is None


def _dry_run_refusals(api_client: client.ApiClient, namespace: str, stack: str) -> list[str]:
    """What the API server refuses among the objects (and the StatefulSet's Pods' revision label) for `stack`."""
    dynamic = DynamicClient(api_client)
    spec = api.parse_spec(naming.LARGEST_SPEC)
    manifests = objects.workloads(stack, namespace, spec)
    statefulset = next(m for m in manifests if m["kind"] == "StatefulSet")
    # What the StatefulSet controller will stamp on its Pods: a 10-character revision hash.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{statefulset['metadata']['name']}-0",
            "namespace": namespace,
            "labels": {"controller-revision-hash": f"{statefulset['metadata']['name']}-7c9d8f6b5d"},
        },
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    refused = []
    # One of each kind is enough for the names; the longest Service and Deployment are the last ones.
    by_kind: dict[str, dict[str, Any]] = {}
    for manifest in [*manifests, pod]:
        by_kind[manifest["kind"]] = manifest
    for manifest in by_kind.values():
        resource = dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        try:
            resource.create(body=manifest, namespace=namespace, query_params=[("dryRun", "All")])
        except ApiException as refusal:
            assert refusal.status == 422, refusal.body
            refused.append(manifest["kind"])
    return refused


@pytest.fixture(scope="module")
def api_client(kube) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kube.kubeconfig))


@pytest.fixture(scope="module")
def namespace(api_client) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": "stack-names"}})
    yield "stack-names"
    core.delete_namespace("stack-names")


def test_the_limits_are_kubernetes_own(api_client, namespace):
    assert _dry_run_refusals(api_client, namespace, "a" * LIMIT) == []
    assert _dry_run_refusals(api_client, namespace, "a" * (LIMIT + 1)) == ["Pod"]  # the revision label
    assert "Service" in _dry_run_refusals(api_client, namespace, "team.stack")
    assert naming.name_problem("a" * LIMIT, namespace, external=False) is None


@pytest.fixture(scope="module")
def stacks_crd(api_client) -> Iterator[None]:
    extensions = client.ApiextensionsV1Api(api_client)
    extensions.create_custom_resource_definition(yaml.safe_load(crd.crd_yaml()))
    try:
        for _ in range(100):
            status = extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status
            if any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
                break
            time.sleep(0.1)
        yield
    finally:
        extensions.delete_custom_resource_definition(f"{PLURAL}.{GROUP}")


def _stack(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SingularityStack",
        "metadata": {"name": name},
        "spec": spec or {},
    }


def test_the_crd_refuses_names_whose_objects_kubernetes_would_refuse(api_client, namespace, stacks_crd):
    custom = client.CustomObjectsApi(api_client)
    for name in ("team.stack", "a" * (LIMIT + 1)):
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _stack(name))
        assert refused.value.status == 422 and "metadata.name" in refused.value.body
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _stack("a" * LIMIT))
    assert created["metadata"]["name"] == "a" * LIMIT
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "a" * LIMIT)


def test_the_operator_refuses_a_name_an_external_server_would_cut_and_writes_nothing(api_client, namespace):
    events: list[tuple[str, str, str]] = []
    controller = StackController(Kube(api_client), adopt=lambda obj: None, event=lambda *e: events.append(e))
    spec = {"postgres": {"external": {"host": "db.example", "adminSecret": {"name": "pg-admin"}}}}
    stack = "s" * 40  # fine for Kubernetes; default_..._centralcloud_analytics would be 71 bytes
    outcome = controller.reconcile(stack, namespace, copy.deepcopy(spec))
    assert {v.reason for v in outcome.verdicts} == {"InvalidName"} and not any(v.ok for v in outcome.verdicts)
    assert "63 bytes" in outcome.verdicts[0].message
    assert events and events[0][:2] == ("Warning", "InvalidName")
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    secrets = [s.metadata.name for s in core.list_namespaced_secret(namespace).items]
    assert not [name for name in secrets if name.startswith(stack)]
    assert apps.list_namespaced_deployment(namespace).items == []
    assert apps.list_namespaced_stateful_set(namespace).items == []
