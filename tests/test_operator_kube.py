"""The operator, in-process (kopf's KopfRunner), against a real Kubernetes API server and real PostgreSQL.

No kubelet runs, so workloads never become available by themselves: tests that need them available
patch the Deployments' status, as envtest-based suites do. The chart is rendered by Helm and applied first.
The API server keeps an audit log of every write: what the operator wrote (and in which order) is read
there, from outside the operator; windows in which nothing may be written end on the operator's reconcile
counter (so many reconciles have run), never on a clock.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
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
from prometheus_client import REGISTRY

from singularity_stack import cli
from singularity_stack.postgres.cluster import LocalCluster, free_port
from singularity_stack.provision import migrations
from singularity_stack_testing.kube.apiserver import SERVICE_ACCOUNT_ISSUER, ControlPlane
from singularity_stack_testing.postgres import throwaway_cluster

CHART = Path(__file__).resolve().parents[1] / "charts" / "singularity-stack"
GROUP, VERSION, PLURAL = "singularity.dev", "v1alpha1", "singularitystacks"
OPERATOR_SA = "ops-singularity-stack"  # the chart's ServiceAccount for release "ops"
OPERATOR_USER = f"system:serviceaccount:default:{OPERATOR_SA}"
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
    plane = ControlPlane(kube_binaries, controllers=("garbagecollector", "namespace"), audit_writes=True).start()
    api_client = config.new_client_from_config(config_file=str(plane.kubeconfig))
    install_chart(api_client, {}, release="ops", namespace="default")
    wait_for("the CRD", lambda: _crd_established(api_client))
    plane.start_controller_manager()  # after the CRD: it discovers new kinds only every 30 s
    yield plane, api_client
    plane.stop()


def install_chart(api_client: client.ApiClient, values: dict[str, Any], release: str, namespace: str) -> None:
    """What `helm install` creates, rendered by Helm (the CRD first); the operator's own Deployment is left
    out (no kubelet runs it: the tests run the operator in-process, as that Deployment would)."""
    rendered = helm.Chart.load(str(CHART)).render(values, name=release, namespace=namespace, is_install=True)
    dynamic = DynamicClient(api_client)
    for path, text in sorted(rendered.items(), key=lambda item: "crd" not in item[0]):
        for doc in yaml.safe_load_all(text) if path.endswith(".yaml") else []:
            if doc and doc["kind"] != "Deployment":
                dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"]).create(
                    body=doc, namespace=doc["metadata"].get("namespace", namespace)
                )


def operator_kubeconfig(
    plane: ControlPlane, api_client: client.ApiClient, account: str = OPERATOR_SA, namespace: str = "default"
) -> Path:
    """A kubeconfig with a token of the ServiceAccount the chart gives the operator (TokenRequest API)."""
    request = {"spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": 3600}}
    token = client.CoreV1Api(api_client).create_namespaced_service_account_token(account, namespace, request)
    path = plane.kubeconfig.with_name(f"{namespace}-{account}.kubeconfig")
    return plane.kubeconfig_for(path, f"system:serviceaccount:{namespace}:{account}", {"token": token.status.token})


RECONCILES = "singularity_operator_reconciles_total"


def reconciles() -> float:
    """Reconciles the in-process operator has finished (its own Prometheus counter, every result)."""
    return sum(REGISTRY.get_sample_value(RECONCILES, {"result": r}) or 0.0 for r in ("ok", "not_ready", "error"))


def writes(plane: ControlPlane, user: str = OPERATOR_USER, since: int = 0) -> list[dict[str, Any]]:
    """The writes `user` made (audit log, oldest first), from the `since`-th on; refused ones included."""
    return plane.api_writes(user)[since:]


def describe(found: list[dict[str, Any]]) -> list[str]:
    return [f"{w['verb']} {w['objectRef']} -> {w['responseStatus']['code']}" for w in found]


def writes_while_reconciling(plane: ControlPlane, count: int, user: str = OPERATOR_USER) -> list[dict[str, Any]]:
    """Every write `user` makes while the operator finishes `count` more reconciles (at least `count` - 1
    of them whole, with whatever they post afterwards: the window ends on the counter, not on a clock)."""
    start, done = len(plane.api_writes(user)), reconciles()
    wait_for(f"{count} more reconciles", lambda: reconciles() >= done + count, timeout=30 + 10 * count)
    return writes(plane, user, since=start)


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
    default = operator_kubeconfig(plane, api_client)

    @contextlib.contextmanager
    def running(scope: tuple[str, ...] = ("--all-namespaces",), kubeconfig: Path = default) -> Iterator[KopfRunner]:
        config = OperatorConfig(kubeconfig=kubeconfig, health_interval_seconds=2, metrics_port=METRICS_PORT)
        args = ["run", "--standalone", *scope, f"--liveness=http://127.0.0.1:{LIVENESS_PORT}/healthz"]
        with KopfRunner(args, timeout=60, registry=handlers.register(config)) as runner:
            yield runner
        assert runner.exception is None, runner.output

    return running


@contextlib.contextmanager
def scratch_namespace(api_client: client.ApiClient) -> Iterator[str]:
    """A new namespace, cleared afterwards so later operator runs do not resume its stacks."""
    name = f"stack-test-{next(_names)}"
    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        for stack in custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
            stack_name = stack["metadata"]["name"]
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, name, PLURAL, stack_name, {"metadata": {"finalizers": []}}
            )
            with contextlib.suppress(ApiException):
                custom.delete_namespaced_custom_object(GROUP, VERSION, name, PLURAL, stack_name)
        core.delete_namespace(name)


@pytest.fixture
def namespace(cluster) -> Iterator[str]:
    with scratch_namespace(cluster[1]) as name:
        yield name


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

    def run_init_containers(self, name: str) -> dict[str, int]:
        """What each Deployment's pod runs first, here in-process: its init container's command (`migrate
        <service>`, from this checkout's package) with the DATABASE_URL its Secret gives it. Exit codes by
        Deployment."""
        codes = {}
        for deployment_name, deployment in self.deployments(name).items():
            for init in deployment.spec.template.spec.init_containers or []:
                [ref] = [e.value_from.secret_key_ref for e in init.env if e.name == "DATABASE_URL"]
                url = self.secret(ref.name)[ref.key]
                codes[deployment_name] = cli.main([*init.args, "--database-url", url])
        return codes

    def make_available(self, name: str) -> None:
        """What a kubelet would do: run each pod's init container, then report every Deployment available."""
        codes = self.run_init_containers(name)
        assert set(codes.values()) == {0}, codes
        for deployment in self.deployments(name):
            self.apps.patch_namespaced_deployment_status(
                deployment,
                self.namespace,
                {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}},
            )

    def events(self, name: str) -> list[Any]:
        selector = f"involvedObject.name={name},involvedObject.kind=SingularityStack"
        return self.core.list_namespaced_event(self.namespace, field_selector=selector).items

    def wait_event(self, name: str, reason: str, contains: str = "") -> Any:
        def check() -> Any:
            return next((e for e in self.events(name) if e.reason == reason and contains in e.message), None)

        try:
            return wait_for(f"an Event {reason} {contains!r} on {name}", check)
        except AssertionError:
            seen = [(e.type, e.reason, e.message[:300]) for e in self.events(name)]
            raise AssertionError(f"no Event {reason} {contains!r} on {name}; seen: {seen}") from None

    def all_secrets(self) -> dict[str, dict[str, str]]:
        return {s.metadata.name: dict(s.data or {}) for s in self.core.list_namespaced_secret(self.namespace).items}

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
    plane, api_client = cluster
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
        assert stacks.condition("alpha", "QueueReady")["status"] == "True"
        assert stacks.condition("alpha", "Ready")["status"] == "False"  # no workload is available yet
        # The operator migrated no database: its package is not the image's. Each stays empty until its pods'
        # init container runs, and the status says so.
        owners = ("centralcloud", "genesis", "nexus", "singularity_1")
        assert status["migrations"] == {prefix + o: [] for o in owners}
        assert {o: yoyo_table(stacks, f"alpha-{o.replace('_', '-')}-db") for o in owners} == dict.fromkeys(owners)
        waiting = stacks.condition("alpha", "MigrationsSucceeded")
        assert (waiting["status"], waiting["reason"]) == ("Unknown", "AwaitingInitContainers")
        assert (
            waiting["message"].startswith(f"{prefix}centralcloud, {prefix}genesis, ")
            and "init container" in waiting["message"]
        )
        assert all("lastMigration" not in s for s in status["services"].values())

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

        # the pods' init containers (`singularity-stack migrate <service>`, as the pod runs it) apply the image's
        # migrations; the status then shows what each database records
        stacks.make_available("alpha")
        ready = stacks.wait_condition("alpha", "Ready", "True")
        assert ready["reason"] == "AllReady"
        status = stacks.get("alpha")["status"]
        latest = {o: migrations.available_migrations(migrations.service_kind(o)) for o in owners}
        assert status["migrations"] == {prefix + o: latest[o] for o in owners}
        assert status["services"]["singularity_1"]["lastMigration"] == latest["singularity_1"][-1]
        assert stacks.condition("alpha", "MigrationsSucceeded")["reason"] == "Applied"

        # every step left an Event on the stack; the operator is alive and counts its reconciles
        reasons = wait_for("events", lambda: {e.reason for e in stacks.events("alpha")} >= {"Provisioned", "Created"})
        assert reasons
        # and no failure on the way (the timer's reconciles never raced the first one)
        assert [(e.reason, e.message) for e in stacks.events("alpha") if e.type != "Normal"] == []
        assert httpx.get(f"http://127.0.0.1:{LIVENESS_PORT}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        assert 'singularity_operator_reconciles_total{result="ok"}' in metrics

        # idle reconciles (the 2 s timer) write nothing at all: no status patch, no Event, no object
        assert len(stacks.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]) == 1  # all ticks: alpha's
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)

        # scale 1 → 3: the new instances' databases are provisioned (roles, databases, their credentials'
        # Secrets) before any Deployment is written, new or existing; not migrated (their pods' init containers do)
        since = len(writes(plane))
        stacks.patch_spec("alpha", {"singularity": {"replicas": 3}})
        wait_for("three instances", lambda: len([d for d in stacks.deployments("alpha") if "singularity" in d]) == 3)
        scaling = writes(plane, since=since)
        order = [(w["verb"], w["objectRef"]["resource"], w["objectRef"].get("name")) for w in scaling]
        new_secrets = [order.index(("create", "secrets", f"alpha-singularity-{i}-db")) for i in (2, 3)]
        first_deployment = next(i for i, (_, kind, _) in enumerate(order) if kind == "deployments")
        assert max(new_secrets) < first_deployment, order
        created = {name for verb, kind, name in order if verb == "create" and kind == "deployments"}
        assert created == {"alpha-singularity-2", "alpha-singularity-3"}, order
        # the new databases are left empty for their pods' init containers: the first reconcile makes no Job for
        # them and does not wait on one, and the stack says what it waits for
        waiting = stacks.wait_condition("alpha", "MigrationsSucceeded", "Unknown")
        assert waiting["message"].startswith(f"{prefix}singularity_2, {prefix}singularity_3: no migration"), waiting
        assert {yoyo_table(stacks, f"alpha-singularity-{i}-db") for i in (2, 3)} == {None}
        assert not [w for w in scaling if w["objectRef"]["resource"] == "jobs"], describe(scaling)
        stacks.make_available("alpha")
        stacks.wait_condition("alpha", "Ready", "True")
        instances = stacks.get("alpha")["status"]["services"]
        assert {instances[f"singularity_{i}"]["lastMigration"] for i in (1, 2, 3)} == {latest["singularity_1"][-1]}
        assert prefix + "singularity_3" in databases(pg_cluster, prefix)
        stacks.wait_event("alpha", "Provisioned", f"created database {prefix}singularity_3")  # Events for changes
        stacks.wait_event("alpha", "Created", "Deployment alpha-singularity-3")
        assert stacks.secret("alpha-singularity-1-db") == creds  # an existing password is never regenerated
        assert {s: stacks.secret(f"alpha-{s}-api") for s in api_tokens} == api_tokens  # nor a token
        assert stacks.secret("alpha-nexus-reviewers") == {"reviewers.json": admins}  # nor the reviewers
        # 3 → 1: workloads go, data stays (Retain)
        stacks.patch_spec("alpha", {"singularity": {"replicas": 1}})
        wait_for("one instance", lambda: len([d for d in stacks.deployments("alpha") if "singularity" in d]) == 1)
        assert prefix + "singularity_3" in databases(pg_cluster, prefix)
        stacks.wait_event("alpha", "ScaledDown", "instance 3")

        stacks.delete("alpha")
        wait_for("the stack to be gone", lambda: not _exists(stacks, "alpha"), timeout=120)
    assert prefix + "shared_queue" in databases(pg_cluster, prefix)  # Retain


def yoyo_table(stacks: Stacks, secret: str) -> str | None:
    """Whether the database of a credentials Secret has yoyo's table (None: never migrated), as its role sees it."""
    with psycopg.connect(stacks.secret(secret)["DATABASE_URL"]) as conn:
        row = conn.execute("SELECT to_regclass('_yoyo_migration')::text").fetchone()
    return row[0] if row else None


def _exists(stacks: Stacks, name: str) -> bool:
    try:
        stacks.get(name)
        return True
    except ApiException as error:
        if error.status == 404:
            return False
        raise


def test_invalid_specs_are_refused_or_reported(cluster, operator, namespace, pg_cluster):
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    with pytest.raises(ApiException) as refused:  # the schema refuses what it can express
        stacks.create("bad", {"singularity": {"replicas": 0}})
    assert refused.value.status == 422 and "spec.singularity.replicas" in refused.value.body
    with operator():
        stacks.create("both", {"postgres": {"managed": {}, "external": {"host": "x", "adminSecret": {"name": "s"}}}})
        ready = stacks.wait_condition("both", "Ready", "False")
        assert ready["reason"] == "InvalidSpec"
        assert "exactly one of managed and external" in ready["message"]
        # reported by an Event once, when it was found: the idle reconciles after it write nothing
        stacks.wait_event("both", "InvalidSpec", "exactly one of managed and external")
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)
        assert [e.type for e in stacks.events("both") if e.reason == "InvalidSpec"] == ["Warning"]
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
        assert stacks.wait_event("late", "PostgresUnreachable").type == "Warning"
        stopped_cluster.start()
        stacks.wait_condition("late", "DatabasesReady", "True", timeout=90)


def test_operator_restarted_mid_reconcile_recovers_without_duplicates(cluster, operator, namespace, pg_cluster):
    """The first run is stopped inside its reconcile: databases, roles, every Secret and two of the five
    Deployments exist (a ResourceQuota, a real API server seam, refuses the third). The next run finishes
    the same reconcile without generating a password, token or Secret anew."""
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    hard = {"count/deployments.apps": "2"}
    stacks.core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "two"}, "spec": {"hard": hard}})
    # No quota controller runs here: its status (which admission enforces and counts up) is set by hand.
    used = {"hard": hard, "used": {"count/deployments.apps": "0"}}
    stacks.core.patch_namespaced_resource_quota_status("two", namespace, {"status": used})
    since = len(writes(plane))
    stacks.create("restart", external(pg_cluster, singularity={"replicas": 2}))

    def refused() -> bool:
        return any(w["objectRef"]["resource"] == "deployments" and w["responseStatus"]["code"] == 403
                   for w in writes(plane, since=since))  # fmt: skip

    with operator():
        wait_for("the third Deployment to be refused", refused)
        # the failure is reported on the stack, in the API server's words
        event = stacks.wait_event("restart", "ReconcileFailed", "exceeded quota")
        assert event.type == "Warning" and event.message.startswith("403 Forbidden: ")
        assert {e.reason for e in stacks.events("restart") if e.type != "Normal"} == {"ReconcileFailed"}
    prefix = f"{namespace}_restart_".replace("-", "_")
    assert sorted(stacks.deployments("restart")) == ["restart-centralcloud", "restart-nexus"]  # mid-way
    assert databases(pg_cluster, prefix) == {
        prefix + n for n in ("shared_queue", "centralcloud", "genesis", "nexus", "singularity_1", "singularity_2")
    }
    before = stacks.all_secrets()
    assert {f"restart-{n}-db" for n in ("nexus", "genesis", "centralcloud", "singularity-1", "singularity-2")} | {
        "restart-nexus-ui",
        "restart-singularity-api",
        "restart-centralcloud-api",
        "restart-nexus-reviewers",
    } <= set(before)

    # a new operator picks up where the first stopped
    stacks.core.delete_namespaced_resource_quota("two", namespace)
    with operator():
        wait_for("five Deployments", lambda: len(stacks.deployments("restart")) == 5)
        stacks.make_available("restart")
        stacks.wait_condition("restart", "Ready", "True")
    assert stacks.all_secrets() == before  # no Secret written anew, no password or token regenerated
    for logical in ("centralcloud", "genesis", "nexus", "singularity-1", "singularity-2"):
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
        done = reconciles()
        wait_for("two more reconciles", lambda: reconciles() >= done + 2)  # the generated password stays
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


def test_a_namespaced_install_reconciles_only_its_namespaces(cluster, operator, pg_cluster):
    """The chart with `watchNamespaces: [inside]`: its RBAC (a Role in `inside` only) and the operator
    started as the chart's Deployment starts it (`--namespace=inside`). A stack next door is left alone."""
    plane, api_client = cluster
    with (
        scratch_namespace(api_client) as home,
        scratch_namespace(api_client) as inside,
        scratch_namespace(api_client) as outside,
    ):
        # The CRD and Genesis's cluster-wide ClusterRole are the first release's: one each per cluster.
        values = {"watchNamespaces": [inside], "crds": {"create": False}, "genesisJobsRole": {"create": False}}
        install_chart(api_client, values, release="scoped", namespace=home)
        account = "scoped-singularity-stack"
        kubeconfig = operator_kubeconfig(plane, api_client, account, home)
        ours, theirs = Stacks(api_client, inside), Stacks(api_client, outside)
        for stacks in (theirs, ours):
            stacks.admin_secret(pg_cluster)
            stacks.create("s", external(pg_cluster))
        untouched = theirs.get("s")
        user = f"system:serviceaccount:{home}:{account}"
        since = len(writes(plane, user))
        with operator(scope=("--namespace", inside), kubeconfig=kubeconfig):
            ours.wait_condition("s", "DatabasesReady", "True")
            writes_while_reconciling(plane, 3, user)  # and a few health checks more
        by_namespace = {w["objectRef"].get("namespace") for w in writes(plane, user, since=since)}
        assert by_namespace == {inside}  # not even a refused attempt anywhere else
        assert theirs.get("s") == untouched  # no status, finalizer or annotation: never seen
        assert databases(pg_cluster, f"{outside}_s_".replace("-", "_")) == set()
        assert databases(pg_cluster, f"{inside}_s_".replace("-", "_"))
        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.delete_cluster_role_binding("scoped-singularity-stack")
        rbac.delete_cluster_role("scoped-singularity-stack")


@contextlib.contextmanager
def operator_command(
    plane: ControlPlane, api_client: client.ApiClient, log: Path, scope: list[str], interval: int = 2
) -> Iterator[tuple[int, int]]:
    """`singularity-stack operator ...` exactly as the chart's Deployment runs it, as the chart's
    ServiceAccount; yields its (liveness, metrics) ports once it answers, and checks it stops cleanly."""
    liveness, metrics = free_port(), free_port()
    cli = Path(sys.executable).with_name("singularity-stack")
    argv = [str(cli), "operator", f"--liveness-port={liveness}", f"--metrics-port={metrics}", *scope]
    kubeconfig = str(operator_kubeconfig(plane, api_client))
    env = {**os.environ, "KUBECONFIG": kubeconfig, "HEALTH_INTERVAL_SECONDS": str(interval)}
    with log.open("w") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:

            def answers() -> bool:
                assert process.poll() is None, log.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(f"http://127.0.0.1:{liveness}/healthz", timeout=2).status_code == 200
                return False

            wait_for("the liveness endpoint", answers, 60)
            yield liveness, metrics
        finally:
            process.terminate()
            process.wait(30)
    assert process.returncode == 0, log.read_text()


def scraped_reconciles(metrics: int) -> float:
    """The operator's reconcile count, as Prometheus scrapes it."""
    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(RECONCILES + "{"))


@pytest.mark.parametrize("scope", [["--all-namespaces"], ["--namespace", "team-a", "--namespace", "team-b"]])
def test_the_operator_command_runs_as_the_chart_starts_it(cluster, scope: list[str], tmp_path: Path) -> None:
    """Up, alive, scrapeable."""
    plane, api_client = cluster
    with operator_command(plane, api_client, tmp_path / "operator.log", scope) as (_, metrics):
        assert httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).status_code == 200


def test_the_operator_command_writes_nothing_while_idle(cluster, namespace, pg_cluster, tmp_path: Path) -> None:
    """As a user runs it (health checks every 4 s): once the stack is Ready, the health checks write
    nothing at all, Events included (the audit log over the operator's own count of reconciles)."""
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    log = tmp_path / "operator.log"
    with operator_command(plane, api_client, log, ["--all-namespaces"], interval=4) as (_, metrics):
        stacks.create("idle", external(pg_cluster))
        stacks.wait_condition("idle", "DatabasesReady", "True")
        stacks.make_available("idle")
        stacks.wait_condition("idle", "Ready", "True")
        assert len(stacks.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]) == 1
        start, done = len(writes(plane)), scraped_reconciles(metrics)
        wait_for("four more health checks", lambda: scraped_reconciles(metrics) >= done + 4, timeout=60)
        idle = writes(plane, since=start)
    assert idle == [], describe(idle)
    assert stacks.events("idle")  # the changes were reported: Events are posted by this command


def test_back_to_bubblewrap_deletes_the_pod_sandboxs_account_binding_and_policy(
    cluster, operator, namespace, pg_cluster
):
    """spec.genesis.sandbox pod → bubblewrap: Genesis's ServiceAccount, its RoleBinding of the job-Pods
    ClusterRole and the job Pods' NetworkPolicy go (nothing left that could still manage Pods); the stack's own
    account and its other policies stay, and once done, idle reconciles write nothing."""
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    rbac, networking = client.RbacAuthorizationV1Api(api_client), client.NetworkingV1Api(api_client)

    def present() -> dict[str, set[str]]:
        return {
            "ServiceAccount": {a.metadata.name for a in stacks.core.list_namespaced_service_account(namespace).items},
            "RoleBinding": {b.metadata.name for b in rbac.list_namespaced_role_binding(namespace).items},
            "NetworkPolicy": {p.metadata.name for p in networking.list_namespaced_network_policy(namespace).items},
        }

    with operator():
        stacks.create("box", external(pg_cluster, genesis={"sandbox": "pod"}))
        policies = {"box-genesis-jobs", "box-genesis", "box-nexus", "box-centralcloud", "box-singularity"}
        wait_for("the pod sandbox and every policy", lambda: policies <= present()["NetworkPolicy"])
        before = present()
        assert "box-genesis-jobs" in before["RoleBinding"]
        assert {"box", "box-genesis"} <= before["ServiceAccount"] and "box-genesis-jobs" in before["NetworkPolicy"]
        stacks.patch_spec("box", {"genesis": {"sandbox": "bubblewrap"}})
        wait_for("the job Pods' NetworkPolicy to go", lambda: "box-genesis-jobs" not in present()["NetworkPolicy"])
        after = present()
        assert after["RoleBinding"] == before["RoleBinding"] - {"box-genesis-jobs"}
        assert after["ServiceAccount"] == before["ServiceAccount"] - {"box-genesis"}
        assert after["NetworkPolicy"] == before["NetworkPolicy"] - {"box-genesis-jobs"}
        assert after["NetworkPolicy"] == policies - {"box-genesis-jobs"}  # the services' own stay
        assert stacks.deployments("box")["box-genesis"].spec.template.spec.service_account_name == "box"
        for kind in ("ServiceAccount box-genesis", "RoleBinding box-genesis-jobs", "NetworkPolicy box-genesis-jobs"):
            stacks.wait_event("box", "Deleted", f"deleted {kind} (genesis.sandbox is bubblewrap)")
        stacks.make_available("box")
        stacks.wait_condition("box", "Ready", "True")
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)
