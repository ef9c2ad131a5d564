"""The CRD on a current Kubernetes: apiextensions-apiserver 1.36 (the CRD server of kube-apiserver, built
from Debian sid's Go sources by scripts/build-apiextensions-apiserver.sh) with its own etcd, delegating
authentication, authorization and namespaces to a 1.20 control plane (tests/kube_fixture.py). Its CEL
rules are enforced by the server: a stack with both or neither of managed and external, or a Localhost
seccomp profile without its path, is refused with 422 and the rule's message; a good stack is applied
server-side.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes.client import ApiClient, ApiextensionsV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from singularity_operator import api, crd
from singularity_stack_testing.kube.apiserver import ControlPlane, free_ports
from singularity_stack_testing.kube.processes import ProcessGroup

CACHE = Path(os.environ.get("SINGULARITY_APIEXTENSIONS_CACHE", "/var/cache/singularity-stack/apiextensions-1.36"))
BINARY = CACHE / "bin" / "apiextensions-apiserver"
GROUP_VERSION = f"{api.GROUP}/{api.VERSION}"
EXAMPLES = crd.REPO / "charts" / "singularity-stack" / "examples"
# The server's self-signed certificate (--cert-dir), on loopback: not verified.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


@pytest.fixture(scope="module")
def binary() -> Path:
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        return BINARY
    message = (
        f"NO apiextensions-apiserver 1.36 AT {BINARY} - THE CRD'S CEL RULES ARE NOT TESTED ON A CURRENT SERVER. "
        "Build it once with scripts/build-apiextensions-apiserver.sh (scripts/test.sh does)."
    )
    if os.environ.get("SINGULARITY_REQUIRE_KUBE") == "1":
        pytest.fail(message, pytrace=False)
    warnings.warn(message, stacklevel=1)
    pytest.skip(message)


def _ready(client: ApiClient) -> bool:
    """Admitting CRDs (its admission plugins synced), the 1.20 server vouching for the caller."""
    try:
        ApiextensionsV1Api(client).create_custom_resource_definition(crd.build_crd(), dry_run="All")
    except (ApiException, OSError, urllib3.exceptions.HTTPError):
        return False
    return True


@pytest.fixture(scope="module")
def server(binary: Path, kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    workdir = tmp_path_factory.mktemp("apiextensions-1.36")
    group = ProcessGroup(workdir)
    etcd_port, etcd_peer, port = free_ports(3)
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    group.launch(
        "etcd",
        [
            str(kube.binaries.etcd),
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
            "--log-level=warn",
        ],
    )
    delegate = str(kube.kubeconfig)  # the 1.20 server answers TokenReviews, SubjectAccessReviews, namespaces
    group.launch(
        "apiextensions-apiserver",
        [
            str(binary),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={workdir / 'certs'}",
            f"--kubeconfig={delegate}",
            f"--authentication-kubeconfig={delegate}",
            f"--authorization-kubeconfig={delegate}",
            # What would wait forever for APIs 1.20 does not serve (admissionregistration's policies,
            # flowcontrol v1): the CEL rules of a CRD are the schema's, not an admission plugin's.
            "--disable-admission-plugins=ValidatingAdmissionPolicy,MutatingAdmissionPolicy",
            "--enable-priority-and-fairness=false",
        ],
    )
    config = yaml.safe_load(kube.kubeconfig.read_text())
    for cluster in config["clusters"]:
        # The server's own self-signed certificate (--cert-dir), on loopback.
        cluster["cluster"] = {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    client = new_client_from_config(config_file=str(kubeconfig))
    try:
        deadline = time.monotonic() + 90
        while not _ready(client):
            if not group.running or time.monotonic() > deadline:
                pytest.fail(f"apiextensions-apiserver did not start:\n{group.log_tail('apiextensions-apiserver')}")
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        group.stop()


@pytest.fixture(scope="module")
def installed(server: ApiClient) -> ApiClient:
    extensions = ApiextensionsV1Api(server)
    definition = crd.build_crd()
    extensions.create_custom_resource_definition(definition)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conditions = extensions.read_custom_resource_definition(definition["metadata"]["name"]).status.conditions
        if any(c.type == "Established" and c.status == "True" for c in conditions or []):
            return server
        time.sleep(0.2)
    pytest.fail("the CRD was not Established on 1.36")


def stack(spec: dict[str, Any]) -> dict[str, Any]:
    name = f"s-{uuid.uuid4().hex[:8]}"
    return {"apiVersion": GROUP_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def create(client: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = CustomObjectsApi(client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, "default", api.PLURAL, body
    )
    return created


def test_the_stored_crd_keeps_its_cel_rules(installed: ApiClient):
    response = ApiextensionsV1Api(installed).read_custom_resource_definition(
        crd.build_crd()["metadata"]["name"], _preload_content=False
    )
    stored = yaml.safe_load(response.data)
    spec = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["postgres"]["x-kubernetes-validations"] == crd.CEL_RULES["PostgresSpec"]


EXTERNAL = {"host": "db.example", "adminSecret": {"name": "pg-admin"}}
REFUSED = {
    "both servers": ({"postgres": {"managed": {}, "external": EXTERNAL}}, "set exactly one of managed and external"),
    "no server": ({"postgres": {}}, "set exactly one of managed and external"),
    "Localhost without a profile": (
        {"genesis": {"seccompProfile": {"type": "Localhost"}}},
        "localhostProfile is set exactly when type is Localhost",
    ),
    "a profile without Localhost": (
        {"genesis": {"seccompProfile": {"type": "Unconfined", "localhostProfile": "x.json"}}},
        "localhostProfile is set exactly when type is Localhost",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_cel_rule_refuses_a_bad_stack_with_422(installed: ApiClient, case: str):
    spec, message = REFUSED[case]
    with pytest.raises(ApiException) as refused:
        create(installed, stack(spec))
    assert refused.value.status == 422, refused.value.body
    assert message in refused.value.body


def test_a_good_stack_is_applied_server_side(installed: ApiClient):
    body = stack(
        {
            "postgres": {"external": EXTERNAL},
            "genesis": {
                "seccompProfile": {"type": "Localhost", "localhostProfile": "singularity-stack/genesis-seccomp.json"}
            },
        }
    )
    objects = CustomObjectsApi(installed)
    name = body["metadata"]["name"]
    # (the generated client returns nothing for the 201 of an apply that creates: read it back)
    objects.patch_namespaced_custom_object(
        api.GROUP,
        api.VERSION,
        "default",
        api.PLURAL,
        name,
        body,
        field_manager="singularity-test",
        _content_type="application/apply-patch+yaml",
    )
    applied = objects.get_namespaced_custom_object(api.GROUP, api.VERSION, "default", api.PLURAL, name)
    assert applied["spec"]["postgres"]["external"]["host"] == "db.example"
    assert [(f["manager"], f["operation"]) for f in applied["metadata"]["managedFields"]] == [
        ("singularity-test", "Apply")
    ]
    # ... and the default-managed stack the operator's docs show
    example = yaml.safe_load(
        (crd.REPO / "charts" / "singularity-stack" / "examples" / "singularitystack.yaml").read_text()
    )
    assert create(installed, example)["spec"]["postgres"]["managed"]["storage"] == "1Gi"
