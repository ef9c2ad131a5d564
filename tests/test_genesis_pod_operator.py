"""spec.genesis.sandbox pod, on the operator's side: the objects it builds (pure), and on a real kube-apiserver
(no kubelet) that the operator, as the chart's ServiceAccount, can apply them, and that Genesis's ServiceAccount
can then create, watch, read the logs of and delete Pods in its namespace and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from test_operator_kube import install_chart, operator_kubeconfig, wait_for

from singularity_operator import api, objects
from singularity_operator.kube import Kube
from singularity_stack.genesis.pod_sandbox import PodRunner, PodSandboxSettings
from singularity_stack.genesis.runner import JobRunner
from singularity_stack.genesis.service import GenesisService, GenesisSettings
from singularity_stack_testing import manifests
from singularity_stack_testing.kube.apiserver import ControlPlane

STACK, NAMESPACE = "demo", "team"
POD_SPEC = {"genesis": {"sandbox": "pod", "runtimeClassName": "gvisor"}}


def built(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return objects.workloads(STACK, NAMESPACE, api.parse_spec(spec))


def genesis_deployment(found: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = [m for m in found if m["kind"] == "Deployment" and m["metadata"]["name"] == "demo-genesis"]
    return deployment


def named(found: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [manifest] = [m for m in found if m["kind"] == kind and m["metadata"]["name"] == name]
    return manifest


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


# -- pure ----------------------------------------------------------------------------------------------------


def test_bubblewrap_stays_the_default_and_builds_no_pod_sandbox_objects():
    assert api.parse_spec({}).genesis.sandbox is api.GenesisSandbox.BUBBLEWRAP
    found = built({})
    assert not [m for m in found if m["kind"] == "RoleBinding"]
    assert not [m for m in found if m["metadata"]["name"] == "demo-genesis-jobs"]
    pod = genesis_deployment(found)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == STACK and pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    assert "GENESIS_SANDBOX" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_pod_mode_gives_genesis_its_own_account_runtime_default_and_its_settings():
    pod = genesis_deployment(built(POD_SPEC))["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["serviceAccountName"] == "demo-genesis" and pod["automountServiceAccountToken"] is True
    assert "seccompProfile" not in container["securityContext"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e for e in container["env"]}
    assert env["GENESIS_SANDBOX"]["value"] == "pod"
    assert env["GENESIS_JOB_IMAGE"]["value"] == api.DEFAULT_IMAGE  # the stack's image when jobImage is unset
    assert env["GENESIS_RUNTIME_CLASS"]["value"] == "gvisor"
    assert env["GENESIS_JOB_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_UID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    # every other service keeps the stack's account, with no token
    for deployment in (m for m in built(POD_SPEC) if m["kind"] == "Deployment"):
        if deployment["metadata"]["name"] != "demo-genesis":
            assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == STACK


def test_job_image_overrides_the_stacks():
    spec = {"genesis": {"sandbox": "pod", "jobImage": "registry.example/jobs:2"}}
    env = {
        e["name"]: e.get("value")
        for e in genesis_deployment(built(spec))["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["GENESIS_JOB_IMAGE"] == "registry.example/jobs:2"


def test_the_job_network_policy_selects_job_pods_only_and_allows_nothing():
    found = built(POD_SPEC)
    policy = named(found, "NetworkPolicy", "demo-genesis-jobs")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy and "egress" not in policy  # no rule: nothing in, nothing out
    job_pod = manifests.genesis_job_pod(STACK, NAMESPACE, api.parse_spec(POD_SPEC))
    assert matches(policy["podSelector"], job_pod["metadata"]["labels"])
    genesis_labels = genesis_deployment(found)["spec"]["template"]["metadata"]["labels"]
    assert not matches(policy["podSelector"], genesis_labels)
    # no other policy of the stack selects a job Pod (none could open anything for it)
    others = [m for m in found if m["kind"] == "NetworkPolicy" and m["metadata"]["name"] != "demo-genesis-jobs"]
    for other in others:
        selector = other["spec"]["podSelector"]
        plain = {"matchLabels": selector["matchLabels"]}
        if "matchExpressions" not in selector:
            assert not matches(plain, job_pod["metadata"]["labels"]), other["metadata"]["name"]


def test_genesis_reaches_the_api_server_only_in_pod_mode():
    def genesis_ports(spec: dict[str, Any]) -> set[int]:
        egress = named(built(spec), "NetworkPolicy", "demo-genesis")["spec"]["egress"]
        return {p["port"] for rule in egress if "to" not in rule for p in rule["ports"]}

    assert {443, 6443} <= genesis_ports(POD_SPEC)
    assert not {443, 6443} & genesis_ports({})


def test_the_role_binding_grants_the_charts_cluster_role_to_genesis_in_its_namespace():
    binding = named(built(POD_SPEC), "RoleBinding", "demo-genesis-jobs")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": objects.GENESIS_JOBS_CLUSTER_ROLE,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-genesis", "namespace": NAMESPACE}]
    account = named(built(POD_SPEC), "ServiceAccount", "demo-genesis")
    assert account["automountServiceAccountToken"] is False  # only Genesis's Pod mounts it


def test_a_bad_runtime_class_name_is_refused():
    with pytest.raises(ValueError, match=r"runtimeClassName|runtime_class_name"):
        api.parse_spec({"genesis": {"sandbox": "pod", "runtimeClassName": "Not_A_Name"}})
    with pytest.raises(ValueError, match="sandbox"):
        api.parse_spec({"genesis": {"sandbox": "docker"}})


# -- on a real API server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plane(kube_binaries) -> Iterator[tuple[ControlPlane, client.ApiClient]]:
    control = ControlPlane(kube_binaries, controllers=("garbagecollector",)).start()
    admin = config.new_client_from_config(config_file=str(control.kubeconfig))
    install_chart(admin, {}, release="ops", namespace="default")
    core = client.CoreV1Api(admin)
    for namespace in (NAMESPACE, "other"):
        core.create_namespace({"metadata": {"name": namespace}})
    # the RuntimeClass admission plugin refuses a Pod whose RuntimeClass does not exist
    client.NodeV1Api(admin).create_runtime_class({"metadata": {"name": "gvisor"}, "handler": "runsc"})
    yield control, admin
    control.stop()


def review(admin: client.ApiClient, user: str, namespace: str, verb: str, resource: str, sub: str = "") -> bool:
    body = {
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"],
            "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource, "subresource": sub},
        }
    }
    return bool(client.AuthorizationV1Api(admin).create_subject_access_review(body).status.allowed)


GENESIS_USER = f"system:serviceaccount:{NAMESPACE}:demo-genesis"


def test_the_operator_applies_the_pod_sandbox_and_genesis_may_manage_job_pods_and_nothing_else(plane):
    control, admin = plane
    as_operator = config.new_client_from_config(config_file=str(operator_kubeconfig(control, admin)))
    spec = api.parse_spec(POD_SPEC)
    # What the operator applies, with its own RBAC (the API server checks it may grant what it binds).
    kube = Kube(as_operator)
    for manifest in objects.workloads(STACK, NAMESPACE, spec):
        assert kube.apply(manifest) == "created", manifest["metadata"]["name"]
    for manifest in objects.genesis_pod_sandbox(STACK, NAMESPACE):
        assert kube.apply(manifest) is None, manifest["metadata"]["name"]  # applied again: nothing to write
    # ... yet it holds no Pod write itself
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(as_operator).create_namespaced_pod(
            NAMESPACE, manifests.genesis_job_pod(STACK, NAMESPACE, spec)
        )
    assert refused.value.status == 403

    allowed = [("create", "pods", ""), ("get", "pods", ""), ("list", "pods", ""), ("watch", "pods", "")]
    allowed += [("delete", "pods", ""), ("get", "pods", "log")]
    for verb, resource, sub in allowed:
        assert review(admin, GENESIS_USER, NAMESPACE, verb, resource, sub), (verb, resource, sub)
    refused_here = [
        ("update", "pods", ""),
        ("patch", "pods", ""),
        ("create", "pods", "exec"),
        ("create", "pods", "attach"),
        ("create", "pods", "portforward"),
        ("patch", "pods", "status"),
        ("get", "secrets", ""),
        ("list", "secrets", ""),
        ("get", "configmaps", ""),
        ("create", "deployments", ""),
        ("create", "serviceaccounts", "token"),
        ("create", "rolebindings", ""),
        ("delete", "networkpolicies", ""),
    ]
    for verb, resource, sub in refused_here:
        assert not review(admin, GENESIS_USER, NAMESPACE, verb, resource, sub), (verb, resource, sub)
    for verb in ("create", "get", "list", "delete"):
        assert not review(admin, GENESIS_USER, "other", verb, "pods"), verb
    # a stack's Genesis in another namespace holds nothing here
    assert not review(admin, "system:serviceaccount:other:demo-genesis", NAMESPACE, "create", "pods")


def test_genesis_creates_reads_and_deletes_a_job_pod_with_its_own_token(plane):
    """As the Genesis ServiceAccount (a TokenRequest token): the job Pod exactly as PodRunner builds it is
    accepted by the API server, listed by its sweep's selector, and deleted; elsewhere it is refused."""
    control, admin = plane
    spec = api.parse_spec(POD_SPEC)
    kube = Kube(config.new_client_from_config(config_file=str(operator_kubeconfig(control, admin))))
    for manifest in objects.workloads(STACK, NAMESPACE, spec):
        kube.apply(manifest)
    as_genesis = config.new_client_from_config(
        config_file=str(operator_kubeconfig(control, admin, account="demo-genesis", namespace=NAMESPACE))
    )
    core = client.CoreV1Api(as_genesis)
    job = manifests.genesis_job_pod(STACK, NAMESPACE, spec)
    job["metadata"].pop("ownerReferences")  # its owner is a real Genesis Pod; here there is none
    created = core.create_namespaced_pod(NAMESPACE, job)
    assert created.spec.automount_service_account_token is False
    assert created.spec.runtime_class_name == "gvisor"
    listed = core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=genesis-job")
    assert [p.metadata.name for p in listed.items] == [job["metadata"]["name"]]
    core.delete_namespaced_pod(job["metadata"]["name"], NAMESPACE, grace_period_seconds=0)
    wait_for("the job Pod gone", lambda: not core.list_namespaced_pod(NAMESPACE).items, timeout=30)
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod("other", {**job, "metadata": {**job["metadata"], "namespace": "other"}})
    assert refused.value.status == 403
    with pytest.raises(ApiException) as refused:
        core.list_namespaced_secret(NAMESPACE)
    assert refused.value.status == 403


def test_the_sweep_at_start_deletes_this_genesis_pods_leftovers_only(plane):
    """PodRunner.sweep, with Genesis's own token: job Pods labelled with this Genesis Pod go, others stay."""
    control, admin = plane
    spec = api.parse_spec(POD_SPEC)
    kube = Kube(config.new_client_from_config(config_file=str(operator_kubeconfig(control, admin))))
    for manifest in objects.workloads(STACK, NAMESPACE, spec):
        kube.apply(manifest)
    as_genesis = config.new_client_from_config(
        config_file=str(operator_kubeconfig(control, admin, account="demo-genesis", namespace=NAMESPACE))
    )
    core = client.CoreV1Api(as_genesis)
    labels = ",".join(f"{k}={v}" for k, v in objects.labels_of_jobs(STACK).items())
    for index, owner in enumerate(("demo-genesis-old", "demo-genesis-old", "demo-genesis-other")):
        job = manifests.genesis_job_pod(STACK, NAMESPACE, spec)
        job["metadata"].pop("ownerReferences")
        job["metadata"]["name"] = f"genesis-job-left{index}"
        job["metadata"]["labels"]["singularity.dev/genesis-owner"] = owner
        core.create_namespaced_pod(NAMESPACE, job)
    settings = PodSandboxSettings(job_namespace=NAMESPACE, job_labels=labels, pod_name="demo-genesis-old")
    assert asyncio.run(PodRunner(core, settings).sweep()) == 2

    def left() -> list[str]:
        return sorted(p.metadata.name for p in core.list_namespaced_pod(NAMESPACE).items)

    wait_for("the sweep", lambda: left() == ["genesis-job-left2"], timeout=30)
    core.delete_namespaced_pod("genesis-job-left2", NAMESPACE, grace_period_seconds=0)


@pytest.mark.parametrize(("account", "ready"), [("demo-genesis", True), ("demo", False)])
async def test_genesis_in_pod_mode_is_ready_only_with_its_rights(plane, monkeypatch, account: str, ready: bool):
    """GENESIS_SANDBOX=pod: the service runs jobs with a PodRunner and, at start, sweeps its leftovers; with
    an account that may not (the stack's own, token-less one), it says so instead of looking ready."""
    control, admin = plane
    spec = api.parse_spec(POD_SPEC)
    kube = Kube(config.new_client_from_config(config_file=str(operator_kubeconfig(control, admin))))
    for manifest in objects.workloads(STACK, NAMESPACE, spec):
        kube.apply(manifest)
    kubeconfig = operator_kubeconfig(control, admin, account=account, namespace=NAMESPACE)
    for name, value in {"KUBECONFIG": str(kubeconfig), "GENESIS_JOB_NAMESPACE": NAMESPACE, "POD_NAME": "g-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = GenesisSettings(
        database_url="postgresql://unused", shared_queue_url="postgresql://unused", sandbox="pod"
    )
    service = GenesisService(settings)
    assert isinstance(service.runner, PodRunner)
    await service.on_start()
    if ready:
        assert service.sandbox_problem is None
        assert service.details()["job_bounds"] == f"a Pod per job in namespace {NAMESPACE} (sandbox: pod)"
    else:
        assert service.sandbox_problem is not None
        assert f"cannot manage job Pods in namespace {NAMESPACE}" in service.sandbox_problem
        assert "Forbidden" in service.sandbox_problem or "403" in service.sandbox_problem


def test_bubblewrap_is_the_services_default():
    settings = GenesisSettings(database_url="postgresql://unused", shared_queue_url="postgresql://unused")
    assert settings.sandbox == "bubblewrap"
    assert isinstance(GenesisService(settings).runner, JobRunner)
