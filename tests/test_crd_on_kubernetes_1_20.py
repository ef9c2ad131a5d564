"""The CRD with its CEL rules on Kubernetes 1.20 (the local node's version, and the test API server's):
1.20 knows no x-kubernetes-validations, accepts the CRD and drops the rules, so there the operator's own
check (api.py) is what refuses a stack with both or neither of managed and external."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest
from kubernetes.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi
from kubernetes.config import new_client_from_config
from pydantic import ValidationError

from singularity_operator import api, crd
from singularity_stack_testing import manifests
from singularity_stack_testing.kube.apiserver import cache_dir


def rules_in(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node.get("x-kubernetes-validations", []), *(r for v in node.values() for r in rules_in(v))]
    if isinstance(node, list):
        return [r for v in node for r in rules_in(v)]
    return []


def test_the_generated_crd_carries_the_cel_rules():
    assert rules_in(crd.build_crd()) == [rule for rules in crd.CEL_RULES.values() for rule in rules]
    assert len(rules_in(crd.build_crd())) == 2


def test_kubernetes_1_20_accepts_the_crd_and_drops_the_rules(make_kube):
    plane = make_kube()
    with new_client_from_config(config_file=str(plane.kubeconfig)) as admin:
        extensions = ApiextensionsV1Api(admin)
        definition = crd.build_crd()
        name = definition["metadata"]["name"]
        extensions.create_custom_resource_definition(definition)
        established = _wait_established(extensions, name)
        assert established, f"CRD {name} not Established on 1.20"
        stored = _raw_crd(admin, name)
        schema = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert rules_in(schema) == []  # dropped, not refused
        postgres = schema["properties"]["spec"]["properties"]["postgres"]
        assert set(postgres["properties"]) == {"managed", "external"}  # the rest of the schema is kept

        # 1.20 cannot refuse a stack with both servers; the operator does (a Ready=False condition).
        both = {"managed": {}, "external": {"host": "db", "adminSecret": {"name": "pg"}}}
        body = {
            "apiVersion": f"{api.GROUP}/{api.VERSION}",
            "kind": api.KIND,
            "metadata": {"name": "both"},
            "spec": {"postgres": both},
        }
        created = CustomObjectsApi(admin).create_namespaced_custom_object(
            api.GROUP, api.VERSION, "default", api.PLURAL, body
        )
        assert created["spec"]["postgres"].keys() == {"managed", "external"}
        with pytest.raises(ValidationError, match="set exactly one of managed and external"):
            api.parse_spec(created["spec"])


def _wait_established(extensions: ApiextensionsV1Api, name: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return True
        time.sleep(0.2)
    return False


def _raw_crd(admin: ApiClient, name: str) -> dict[str, Any]:
    """The CRD as the API server stores it (the client's models would drop unknown fields themselves)."""
    response = ApiextensionsV1Api(admin).read_custom_resource_definition(name, _preload_content=False)
    stored: dict[str, Any] = json.loads(response.data)
    return stored


def test_the_chart_rendered_for_1_20_leaves_the_rules_out_and_for_1_25_keeps_them():
    def crd_of(version: str | None) -> dict[str, Any]:
        [definition] = [d for d in manifests.render_chart({}, version) if d["kind"] == "CustomResourceDefinition"]
        return definition

    assert rules_in(crd_of("v1.20.2")) == [] and crd_of("v1.20.2") == crd.build_crd(cel=False)
    assert crd_of("v1.25.0") == crd_of(None) == crd.build_crd()  # Helm's default is the newest it knows


def test_kubectl_1_20_applies_the_chart_rendered_for_its_server_and_refuses_the_rules(kube):
    """What the e2e suite and `helm install` do on 1.20: validation against the server's OpenAPI, which has
    no x-kubernetes-validations, so the CRD with its rules is refused there (not by the API server)."""
    kubectl = cache_dir() / "bin" / "kubectl"
    assert os.access(kubectl, os.X_OK), f"{kubectl} (scripts/build-kubernetes.sh builds it)"

    def dry_run(definition: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        argv = [str(kubectl), "--kubeconfig", str(kube.kubeconfig), "apply", "--dry-run=server", "-f", "-"]
        return subprocess.run(argv, input=json.dumps(definition), capture_output=True, text=True, timeout=60)

    [for_1_20] = [d for d in manifests.render_chart({}, "v1.20.2") if d["kind"] == "CustomResourceDefinition"]
    accepted = dry_run(for_1_20)
    assert accepted.returncode == 0, accepted.stderr
    refused = dry_run(crd.build_crd())
    assert refused.returncode != 0 and 'unknown field "x-kubernetes-validations"' in refused.stderr, refused
