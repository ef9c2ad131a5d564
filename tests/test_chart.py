"""The Helm chart, linted and rendered by Helm's own engine (the helm-python-sdk wheel bundles Helm 4)."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import yaml

from singularity_operator import crd

CHART = Path(__file__).resolve().parents[1] / "charts" / "singularity-stack"


def render(values: dict | None = None) -> list[dict]:
    rendered = helm.Chart.load(str(CHART)).render(values or {}, name="ops", namespace="operators", is_install=True)
    return [doc for path, text in rendered.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def test_chart_lints_clean():
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_install_watches_every_namespace_with_the_crd():
    docs = render()
    assert kinds(docs) == [
        "ClusterRole",
        "ClusterRole",  # singularity-genesis-jobs, bound to no one by the chart
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
    ]
    [definition] = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert definition == crd.build_crd()
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "singularity-stack:0.1.0"
    assert container["args"][0] == "operator" and "--all-namespaces" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_namespaced_install_uses_roles_and_crds_can_be_left_out():
    docs = render({"watchNamespaces": ["team-a", "team-b"], "crds": {"create": False}})
    assert kinds(docs) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "ServiceAccount",
    ]
    [cluster_role] = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] != GENESIS_JOBS]
    assert {r["apiGroups"][0] for r in cluster_role["rules"]} == {"apiextensions.k8s.io", ""}  # the CRD, namespaces
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


GENESIS_JOBS = "singularity-genesis-jobs"  # objects.GENESIS_JOBS_CLUSTER_ROLE: Genesis's, not the operator's


def test_rbac_is_minimal():
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        for doc in render(values):
            if doc["metadata"]["name"] == GENESIS_JOBS:
                continue  # test_genesis_jobs_cluster_role_is_bound_to_no_one_and_holds_only_job_pods
            for rule in doc.get("rules", []):
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
                pods = [r for r in rule["resources"] if r.startswith("pods")]
                # reading migration Jobs' Pods and their logs (why one failed), never exec, attach or a pod write
                assert set(pods) <= {"pods", "pods/log"}, "no pod/exec, pod/attach or pod/portforward access"
                if pods:
                    assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def test_genesis_jobs_cluster_role_is_bound_to_no_one_and_holds_only_job_pods():
    """The operator binds it to a stack's Genesis in that stack's namespace (sandbox: pod); it holds only `bind`."""
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        docs = render(values)
        [role] = [d for d in docs if d["metadata"]["name"] == GENESIS_JOBS]
        assert role["kind"] == "ClusterRole"
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        ]
        assert not [d for d in docs if d.get("roleRef", {}).get("name") == GENESIS_JOBS]
        binds = [r for d in docs for r in d.get("rules", []) if "bind" in r["verbs"]]
        assert binds and all(r == {**r, "resources": ["clusterroles"], "resourceNames": [GENESIS_JOBS]} for r in binds)
