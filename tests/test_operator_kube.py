"""The operator, in-process (kopf's KopfRunner), against a real Kubernetes API server and real PostgreSQL.

No kubelet runs, so workloads never become available by themselves: tests that need them available
patch the Deployments' status, as envtest-based suites do. The chart is rendered by Helm and applied first.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import psycopg
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from singularity_stack.postgres.cluster import LocalCluster, free_port
from singularity_stack_testing.kube.apiserver import SERVICE_ACCOUNT_ISSUER, ControlPlane
from singularity_stack_testing.postgres import throwaway_cluster

CHART = Path(__file__).resolve().parents[1] / "charts" / "singularity-stack"
GROUP, VERSION, PLURAL = "singularity.dev", "v1alpha1", "singularitystacks"
OPERATOR_SA = "ops-singularity-stack"  # the chart's ServiceAccount for release "ops"
_names = itertools.count(1)
METRICS_PORT, LIVENESS_PORT = free_port(), free_port()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(kube_binaries) -> Iterator[tuple[ControlPlane, client.ApiClient]]:
    """Its own control plane: the chart applied, then a controller-manager without the Deployment
    controller (it would overwrite the availability the tests simulate)."""
    plane = ControlPlane(kube_binaries, controllers=("garbagecollector", "namespace")).start()
    api_client = config.new_client_from_config(config_file=str(plane.kubeconfig))
    rendered = helm.Chart.load(str(CHART)).render({}, name="ops", namespace="default", is_install=True)
    dynamic = DynamicClient(api_client)
    for path, text in sorted(rendered.items(), key=lambda item: "crd" not in item[0]):  # the CRD first
        for doc in yaml.safe_load_all(text) if path.endswith(".yaml") else []:
            if doc:
                dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"]).create(
                    body=doc, namespace=doc["metadata"].get("namespace")
                )
    wait_for("the CRD", lambda: _crd_established(api_client))
    plane.start_controller_manager()  # after the CRD: it discovers new kinds only every 30 s
    yield plane, api_client
    plane.stop()


def operator_kubeconfig(plane: ControlPlane, api_client: client.ApiClient) -> Path:
    """A kubeconfig with a token of the ServiceAccount the chart gives the operator (TokenRequest API)."""
    request = {"spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": 3600}}
    token = client.CoreV1Api(api_client).create_namespaced_service_account_token(OPERATOR_SA, "default", request)
    path = plane.kubeconfig.with_name("operator.kubeconfig")
    return plane.kubeconfig_for(path, f"system:serviceaccount:default:{OPERATOR_SA}", {"token": token.status.token})


def _crd_established(api_client: client.ApiClient) -> bool:
    crd = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


@pytest.fixture(scope="module")
def operator(cluster) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Start the operator (KopfRunner) on demand; several starts in one test simulate restarts."""
    from kopf.testing import KopfRunner

    from singularity_operator import handlers
    from singularity_operator.config import OperatorConfig

    plane, api_client = cluster
    # As the chart's ServiceAccount, so that every API call the operator makes is checked against its RBAC.
    config = OperatorConfig(
        kubeconfig=operator_kubeconfig(plane, api_client), health_interval_seconds=2, metrics_port=METRICS_PORT
    )

    @contextlib.contextmanager
    def running() -> Iterator[KopfRunner]:
        args = ["run", "--standalone", "--all-namespaces", f"--liveness=http://127.0.0.1:{LIVENESS_PORT}/healthz"]
        with KopfRunner(args, timeout=60, registry=handlers.register(config)) as runner:
            yield runner
        assert runner.exception is None, runner.output

    return running


@pytest.fixture
def namespace(cluster) -> Iterator[str]:
    """A namespace per test, cleared afterwards so later operator runs do not resume its stacks."""
    _, api_client = cluster
    name = f"stack-test-{next(_names)}"
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    for stack in custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
        stack_name = stack["metadata"]["name"]
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, name, PLURAL, stack_name, {"metadata": {"finalizers": []}}
        )
        with contextlib.suppress(ApiException):
            custom.delete_namespaced_custom_object(GROUP, VERSION, name, PLURAL, stack_name)
    core.delete_namespace(name)


class Stacks:
    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.namespace = namespace

    def admin_secret(self, cluster: LocalCluster, name: str = "pg-admin") -> None:
        self.core.create_namespaced_secret(
            self.namespace,
            {"metadata": {"name": name}, "stringData": {"username": "postgres", "password": cluster.password}},
        )

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SingularityStack",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        conditions = (self.get(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), None)

    def wait_condition(self, name: str, kind: str, status: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            found = self.condition(name, kind)
            return found if found and found["status"] == status else None

        return wait_for(f"{kind}={status} on {name} (now {self.condition(name, kind)})", check, timeout)

    def deployments(self, name: str) -> dict[str, Any]:
        selector = f"app.kubernetes.io/instance={name}"
        return {
            d.metadata.name: d
            for d in self.apps.list_namespaced_deployment(self.namespace, label_selector=selector).items
        }

    def make_available(self, name: str) -> None:
        """What a kubelet would do: report every Deployment of the stack as available."""
        for deployment in self.deployments(name):
            self.apps.patch_namespaced_deployment_status(
                deployment,
                self.namespace,
                {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}},
            )

    def events(self, name: str) -> list[Any]:
        selector = f"involvedObject.name={name},involvedObject.kind=SingularityStack"
        return self.core.list_namespaced_event(self.namespace, field_selector=selector).items

    def secret(self, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, self.namespace).data
        return {k: base64.b64decode(v).decode() for k, v in data.items()}


def external(cluster: LocalCluster, **extra: Any) -> dict[str, Any]:
    return {
        "postgres": {
            "external": {
                "host": "127.0.0.1",
                "port": cluster.port,
                "adminSecret": {"name": "pg-admin"},
                "sslMode": "disable",
            }
        },
        **extra,
    }


def databases(cluster: LocalCluster, prefix: str) -> set[str]:
    with psycopg.connect(cluster.dsn()) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",))}


def test_apply_provision_become_ready_scale_and_delete_retaining(cluster, operator, namespace, pg_cluster):
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    with operator():
        stacks.create("alpha", external(pg_cluster, image="stack:test"))
        stacks.wait_condition("alpha", "DatabasesReady", "True")
        prefix = f"{namespace}_alpha_".replace("-", "_")
        assert databases(pg_cluster, prefix) == {
            prefix + n for n in ("shared_queue", "centralcloud", "genesis", "nexus", "singularity_1")
        }
        status = stacks.get("alpha")["status"]
        assert status["observedGeneration"] == 1 and status["pgmq"].startswith("1.13.0")
        assert status["migrations"][prefix + "singularity_1"][-1] == "0004.step-names"
        assert stacks.condition("alpha", "QueueReady")["status"] == "True"
        assert stacks.condition("alpha", "MigrationsSucceeded")["status"] == "True"
        assert stacks.condition("alpha", "Ready")["status"] == "False"  # no workload is available yet

        # the workloads carry the right image, environment and secret references, and their credentials work
        deployments = stacks.deployments("alpha")
        assert sorted(deployments) == ["alpha-centralcloud", "alpha-genesis", "alpha-nexus", "alpha-singularity-1"]
        container = deployments["alpha-singularity-1"].spec.template.spec.containers[0]
        assert container.image == "stack:test"
        assert deployments["alpha-singularity-1"].metadata.owner_references[0].kind == "SingularityStack"
        creds = stacks.secret("alpha-singularity-1-db")
        with psycopg.connect(creds["DATABASE_URL"]) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (prefix + "singularity_1",)
        # the HTTP APIs' bearer tokens: generated into their own Secrets, handed to the pods by reference
        api_tokens = {s: stacks.secret(f"alpha-{s}-api") for s in ("singularity", "centralcloud")}
        assert len(api_tokens["singularity"]["SINGULARITY_API_TOKEN"]) >= 16
        assert len(api_tokens["centralcloud"]["CENTRALCLOUD_API_TOKEN"]) >= 16
        refs = {e.name: e.value_from.secret_key_ref.name for e in container.env if e.name == "SINGULARITY_API_TOKEN"}
        assert refs == {"SINGULARITY_API_TOKEN": "alpha-singularity-api"}
        # the named reviewers' Secret: created empty for Nexus to mount; what the admin puts in it stays theirs
        assert stacks.secret("alpha-nexus-reviewers") == {"reviewers.json": "{}\n"}
        admins = json.dumps({"alice": "sha256:" + "0" * 64})
        stacks.core.patch_namespaced_secret(
            "alpha-nexus-reviewers", stacks.namespace, {"stringData": {"reviewers.json": admins}}
        )

        stacks.make_available("alpha")
        ready = stacks.wait_condition("alpha", "Ready", "True")
        assert ready["reason"] == "AllReady"

        # every step left an Event on the stack; the operator is alive and counts its reconciles
        reasons = wait_for("events", lambda: {e.reason for e in stacks.events("alpha")} >= {"Provisioned", "Created"})
        assert reasons
        assert httpx.get(f"http://127.0.0.1:{LIVENESS_PORT}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        assert 'singularity_operator_reconciles_total{result="ok"}' in metrics

        # an idle reconcile (the 2 s timer) writes nothing: the status and its transition time stay put
        before = stacks.get("alpha")
        time.sleep(5)
        after = stacks.get("alpha")
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

        # scale 1 → 3: new instances get their own databases first, then their workloads
        stacks.patch_spec("alpha", {"singularity": {"replicas": 3}})
        wait_for("three instances", lambda: len([d for d in stacks.deployments("alpha") if "singularity" in d]) == 3)
        assert prefix + "singularity_3" in databases(pg_cluster, prefix)
        assert stacks.secret("alpha-singularity-1-db") == creds  # an existing password is never regenerated
        assert {s: stacks.secret(f"alpha-{s}-api") for s in api_tokens} == api_tokens  # nor a token
        assert stacks.secret("alpha-nexus-reviewers") == {"reviewers.json": admins}  # nor the reviewers
        # 3 → 1: workloads go, data stays (Retain)
        stacks.patch_spec("alpha", {"singularity": {"replicas": 1}})
        wait_for("one instance", lambda: len([d for d in stacks.deployments("alpha") if "singularity" in d]) == 1)
        assert prefix + "singularity_3" in databases(pg_cluster, prefix)

        stacks.delete("alpha")
        wait_for("the stack to be gone", lambda: not _exists(stacks, "alpha"), timeout=120)
    assert prefix + "shared_queue" in databases(pg_cluster, prefix)  # Retain


def _exists(stacks: Stacks, name: str) -> bool:
    try:
        stacks.get(name)
        return True
    except ApiException as error:
        if error.status == 404:
            return False
        raise


def test_invalid_specs_are_refused_or_reported(cluster, operator, namespace, pg_cluster):
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    with pytest.raises(ApiException) as refused:  # the schema refuses what it can express
        stacks.create("bad", {"singularity": {"replicas": 0}})
    assert refused.value.status == 422 and "spec.singularity.replicas" in refused.value.body
    with operator():
        stacks.create("both", {"postgres": {"managed": {}, "external": {"host": "x", "adminSecret": {"name": "s"}}}})
        ready = stacks.wait_condition("both", "Ready", "False")
        assert ready["reason"] == "InvalidSpec"
        assert "exactly one of managed and external" in ready["message"]
        stacks.delete("both")  # and it never blocks deletion
        wait_for("deletion", timeout=120, check=lambda: not _exists(stacks, "both"))


@pytest.fixture
def stopped_cluster(open_tmp) -> Iterator[LocalCluster]:
    cluster = throwaway_cluster()
    cluster.init()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_postgres_unreachable_then_back(cluster, operator, namespace, stopped_cluster):
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(stopped_cluster)
    with operator():
        stacks.create("late", external(stopped_cluster))
        waiting = stacks.wait_condition("late", "DatabasesReady", "False")
        assert waiting["reason"] == "PostgresUnreachable"
        stopped_cluster.start()
        stacks.wait_condition("late", "DatabasesReady", "True", timeout=90)


def test_operator_restarted_mid_reconcile_recovers_without_duplicates(cluster, operator, namespace, pg_cluster):
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    stacks.create("restart", external(pg_cluster, singularity={"replicas": 2}))
    with operator():
        wait_for("the first credentials", lambda: _secret_exists(stacks, "restart-nexus-db"), timeout=60)
    # the operator stopped mid-way; a new one picks up where it left off
    with operator():
        stacks.wait_condition("restart", "DatabasesReady", "True")
        stacks.make_available("restart")
        stacks.wait_condition("restart", "Ready", "True")
    secrets = [s.metadata.name for s in stacks.core.list_namespaced_secret(namespace).items]
    assert len(secrets) == len(set(secrets))
    for logical in ("nexus", "singularity-1", "singularity-2"):
        with psycopg.connect(stacks.secret(f"restart-{logical}-db")["DATABASE_URL"]):
            pass  # the password the Secret holds is the role's


def _secret_exists(stacks: Stacks, name: str) -> bool:
    try:
        stacks.core.read_namespaced_secret(name, stacks.namespace)
        return True
    except ApiException:
        return False


def test_delete_policy_drops_the_databases_and_a_vanished_postgres_never_blocks(
    cluster, operator, namespace, stopped_cluster
):
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(stopped_cluster)
    stopped_cluster.start()
    with operator():
        stacks.create("doomed", external(stopped_cluster, deletionPolicy="Delete"))
        stacks.wait_condition("doomed", "DatabasesReady", "True")
        prefix = f"{namespace}_doomed_".replace("-", "_")
        assert databases(stopped_cluster, prefix)
        stacks.delete("doomed")
        wait_for("deletion", timeout=120, check=lambda: not _exists(stacks, "doomed"))
        assert databases(stopped_cluster, prefix) == set()

        stacks.create("orphan", external(stopped_cluster, deletionPolicy="Delete"))
        stacks.wait_condition("orphan", "DatabasesReady", "True")
        stopped_cluster.stop("immediate")  # PostgreSQL is gone for good
        stacks.delete("orphan")
        wait_for("deletion despite the missing database", lambda: not _exists(stacks, "orphan"), timeout=120)


def test_managed_postgres_runs_as_a_statefulset_and_waits_for_it(cluster, operator, namespace):
    """No kubelet here: the managed server is created but never runs, so the stack waits, saying why."""
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    with operator():
        stacks.create("managed", {"postgres": {"managed": {"storage": "2Gi"}}, "deletionPolicy": "Delete"})
        waiting = stacks.wait_condition("managed", "DatabasesReady", "False")
        assert waiting["reason"] == "PostgresUnreachable"
        statefulset = stacks.apps.read_namespaced_stateful_set("managed-postgres", namespace)
        assert statefulset.spec.volume_claim_templates[0].spec.resources.requests == {"storage": "2Gi"}
        assert statefulset.metadata.owner_references[0].name == "managed"
        password = stacks.secret("managed-postgres-admin")["POSTGRES_PASSWORD"]
        assert len(password) >= 24
        time.sleep(3)  # reconciles go on; the generated password stays
        assert stacks.secret("managed-postgres-admin")["POSTGRES_PASSWORD"] == password
        # The claim the StatefulSet controller would make; the Delete policy drops it with the stack.
        core = stacks.core
        claim = {"metadata": {"name": "data-managed-postgres-0"},
                 "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}}  # fmt: skip
        core.create_namespaced_persistent_volume_claim(namespace, claim)
        stacks.delete("managed")
        wait_for("the stack to go", lambda: not stacks.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL)["items"])  # fmt: skip
        claims = core.list_namespaced_persistent_volume_claim(namespace).items
        assert [c.metadata.name for c in claims if not c.metadata.deletion_timestamp] == []


def test_scaling_down_with_delete_policy_drops_the_instance_data(cluster, operator, namespace, pg_cluster):
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    prefix = f"{namespace}_shrink_".replace("-", "_")
    with operator():
        stacks.create("shrink", external(pg_cluster, singularity={"replicas": 2}, deletionPolicy="Delete"))
        stacks.wait_condition("shrink", "DatabasesReady", "True")
        assert prefix + "singularity_2" in databases(pg_cluster, prefix)
        stacks.patch_spec("shrink", {"singularity": {"replicas": 1}})
        wait_for("instance 2's data to go", lambda: prefix + "singularity_2" not in databases(pg_cluster, prefix))
        assert not _secret_exists(stacks, "shrink-singularity-2-db")
        assert prefix + "singularity_1" in databases(pg_cluster, prefix)
        stacks.delete("shrink")
        wait_for("deletion", timeout=120, check=lambda: not _exists(stacks, "shrink"))


@pytest.mark.parametrize("scope", [["--all-namespaces"], ["--namespace", "team-a", "--namespace", "team-b"]])
def test_the_operator_command_runs_as_the_chart_starts_it(cluster, scope: list[str], tmp_path: Path) -> None:
    """`singularity-stack operator ...` exactly as the chart's Deployment runs it: up, alive, scrapeable."""
    import subprocess
    import sys

    plane, api_client = cluster
    liveness, metrics = free_port(), free_port()
    cli = Path(sys.executable).with_name("singularity-stack")
    argv = [str(cli), "operator", f"--liveness-port={liveness}", f"--metrics-port={metrics}", *scope]
    env = {**os.environ, "KUBECONFIG": str(operator_kubeconfig(plane, api_client)), "HEALTH_INTERVAL_SECONDS": "2"}
    log = (tmp_path / "operator.log").open("w")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def answers(url: str) -> bool:
            assert process.poll() is None, (tmp_path / "operator.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url, timeout=2).status_code == 200
            return False

        wait_for("the liveness endpoint", lambda: answers(f"http://127.0.0.1:{liveness}/healthz"), 60)
        assert answers(f"http://127.0.0.1:{metrics}/metrics")
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    assert process.returncode == 0, (tmp_path / "operator.log").read_text()
