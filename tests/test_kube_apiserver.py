"""The throwaway control plane (singularity_stack_testing.kube) is a real Kubernetes API server: what a kopf
operator relies on works.

Needs the binaries from scripts/build-kubernetes.sh (skipped loudly without them; see tests/kube_fixture.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kubernetes.client import ApiClient, ApiextensionsV1Api, CoreV1Api, CustomObjectsApi, RbacAuthorizationV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

GROUP = "test.singularity.dev"
VERSION = "v1"
PLURAL = "widgets"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                ],
            }
        ],
    },
}
# The server-side table `kubectl get` asks for; its columns are the CRD's printer columns.
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def status_of(call: Callable[[], object]) -> int:
    """HTTP status of a client call: 200 when it succeeds, else the ApiException's."""
    try:
        call()
    except ApiException as exc:
        return exc.status
    return 200


@pytest.fixture(scope="module")
def admin(kube) -> Iterator[ApiClient]:
    client = new_client_from_config(config_file=str(kube.kubeconfig))
    yield client
    client.close()


@pytest.fixture(scope="module")
def user(kube) -> Iterator[ApiClient]:
    client = new_client_from_config(config_file=str(kube.kubeconfig), context=kube.test_user)
    yield client
    client.close()


@pytest.fixture
def ns(admin: ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    CoreV1Api(admin).create_namespace({"metadata": {"name": name}})
    yield name
    # Only the controller-manager finishes a namespace deletion; without it the namespace stays Terminating,
    # which is harmless in a throwaway cluster.
    status_of(lambda: CoreV1Api(admin).delete_namespace(name))


@pytest.fixture(scope="module")
def widget_crd(admin: ApiClient) -> str:
    api = ApiextensionsV1Api(admin)
    name = WIDGET_CRD["metadata"]["name"]
    api.create_custom_resource_definition(WIDGET_CRD)

    def established() -> bool:
        conditions = api.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    eventually(established, 30, f"CRD {name} Established")
    return name


def test_namespace_and_configmap(admin, ns):
    core = CoreV1Api(admin)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "settings"}, "data": {"mode": "test"}})

    assert core.read_namespace(ns).status.phase == "Active"
    assert core.read_namespaced_config_map("settings", ns).data == {"mode": "test"}
    assert [cm.metadata.name for cm in core.list_namespaced_config_map(ns).items if cm.metadata.name == "settings"]


def test_pods_are_accepted_without_service_account_tokens(admin, ns):
    # The ServiceAccount admission plugin is off; with no kubelet or scheduler the Pod just stays Pending.
    pod = {"metadata": {"name": "idle"}, "spec": {"containers": [{"name": "main", "image": "debian:bookworm"}]}}
    created = CoreV1Api(admin).create_namespaced_pod(ns, pod)
    assert created.status.phase == "Pending"
    assert created.spec.node_name is None


def test_custom_object_with_status_subresource(admin, ns, widget_crd):
    api = CustomObjectsApi(admin)
    args = (GROUP, VERSION, ns, PLURAL)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}

    created = api.create_namespaced_custom_object(*args, {**body, "status": {"phase": "Ignored"}})
    # With a status subresource the main resource ignores status, and /status ignores everything else.
    assert "status" not in created
    patched = api.patch_namespaced_custom_object_status(
        *args, "w1", {"status": {"phase": "Ready"}, "spec": {"size": 9}}
    )
    assert patched["status"] == {"phase": "Ready"}
    assert patched["spec"] == {"size": 3}
    assert int(patched["metadata"]["generation"]) == 1

    listed = api.list_namespaced_custom_object(*args)
    assert [(item["metadata"]["name"], item["status"]["phase"]) for item in listed["items"]] == [("w1", "Ready")]

    table = api.list_namespaced_custom_object(*args, _headers={"Accept": TABLE})
    columns = [column["name"] for column in table["columnDefinitions"]]
    assert {"Name", "Phase", "Size"} <= set(columns)
    cells = table["rows"][0]["cells"]
    assert (cells[columns.index("Phase")], cells[columns.index("Size")]) == ("Ready", 3)


def test_rbac_denies_the_non_admin_user_until_a_role_allows(kube, admin, user, ns):
    assert status_of(lambda: CoreV1Api(user).list_namespaced_secret(ns)) == 403
    assert status_of(lambda: CoreV1Api(user).list_namespaced_config_map(ns)) == 403

    rbac = RbacAuthorizationV1Api(admin)
    rule = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}
    rbac.create_namespaced_role(ns, {"metadata": {"name": "read-configmaps"}, "rules": [rule]})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "read-configmaps"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": kube.test_user}],
        },
    )

    eventually(lambda: status_of(lambda: CoreV1Api(user).list_namespaced_config_map(ns)) == 200, 10, "role applies")
    assert status_of(lambda: CoreV1Api(user).list_namespaced_secret(ns)) == 403


def test_controller_manager_collects_owned_objects_and_deletes_namespaces(kube, admin, ns, widget_crd):
    kube.start_controller_manager()
    core = CoreV1Api(admin)
    owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "owned", "ownerReferences": [reference]}})
    widget = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "doomed"}}
    CustomObjectsApi(admin).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, widget)

    core.delete_namespaced_config_map("owner", ns)
    eventually(lambda: status_of(lambda: core.read_namespaced_config_map("owned", ns)) == 404, 30, "owned GC'd")

    # The namespace controller empties the namespace (custom objects included) and then removes it.
    core.delete_namespace(ns)
    eventually(lambda: status_of(lambda: core.read_namespace(ns)) == 404, 30, f"namespace {ns} gone")


def test_a_second_control_plane_runs_alongside(kube, make_kube):
    other = make_kube()
    assert other.server != kube.server
    assert other.admin_token != kube.admin_token
    with (
        new_client_from_config(config_file=str(other.kubeconfig)) as second,
        new_client_from_config(config_file=str(kube.kubeconfig)) as first,
    ):
        CoreV1Api(second).create_namespace({"metadata": {"name": "only-in-the-second"}})
        assert status_of(lambda: CoreV1Api(first).read_namespace("only-in-the-second")) == 404

    workdir = other.workdir
    other.stop()
    assert not other.running
    assert workdir is not None
    assert not workdir.exists()
    assert kube.running


def test_the_audit_log_shows_each_write_and_no_read(make_kube):
    """What a bench or test counts an operator's API writes with, from outside the operator."""
    plane = make_kube(audit_writes=True)
    with new_client_from_config(config_file=str(plane.kubeconfig)) as client:
        core = CoreV1Api(client)
        before = len(plane.api_writes(plane.admin_user))
        core.create_namespace({"metadata": {"name": "audited"}})
        core.create_namespaced_config_map("audited", {"metadata": {"name": "c"}, "data": {"a": "1"}})
        core.read_namespaced_config_map("c", "audited")
        core.list_namespaced_config_map("audited")
        core.patch_namespaced_config_map("c", "audited", {"data": {"a": "2"}})
        core.delete_namespaced_config_map("c", "audited")
        writes = plane.api_writes(plane.admin_user)[before:]
    assert [(w["verb"], w["objectRef"]["resource"]) for w in writes] == [
        ("create", "namespaces"),
        ("create", "configmaps"),
        ("patch", "configmaps"),
        ("delete", "configmaps"),
    ]
    assert not plane.api_writes(plane.test_user)
