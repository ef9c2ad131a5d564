"""The connection budget: what a stack may open, that services keep to it, and that the operator sizes or guards
PostgreSQL's max_connections with it (real services, real PostgreSQL, a real API server)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from kubernetes import client, config
from live_services import SINGULARITY_TOKEN, live_service

from singularity_operator import api, objects
from singularity_operator.controller import StackController
from singularity_operator.kube import Kube
from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack.provision import budget
from singularity_stack_testing.postgres import FAST_SETTINGS

_namespaces = itertools.count(1)


def test_the_budget_counts_every_pool_the_operator_configures():
    """The sum over the Deployments' pods (POOL_SIZE, replicas) is the budget: a new service, pool or replica
    cannot escape it."""
    cases = (
        ({"singularity": {"replicas": 1}}, {}),
        ({"singularity": {"replicas": 7}, "nexus": {"replicas": 3}, "genesis": {"replicas": 2}}, {"headroom": 4}),
    )
    for services, pools in cases:
        spec = api.parse_spec({**services, "connections": pools})
        counted = budget.CENTRALCLOUD_EXTRA
        for deployment in objects.service_deployments("s", "ns", spec):
            [container] = deployment["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            per_pod = 2 * int(env["POOL_SIZE"]) + budget.LISTEN_CONNECTIONS
            component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            if component == "nexus":
                per_pod += budget.LISTEN_CONNECTIONS  # its HITL feed listens on its own database too
            counted += deployment["spec"]["replicas"] * per_pod
        assert counted == spec.connection_budget().stack


def test_managed_postgres_admits_50_instances_and_a_few_more_do_not_restart_it():
    def max_connections(replicas: int) -> int:
        spec = api.parse_spec({"singularity": {"replicas": replicas}})
        [container, _exporter] = objects.managed_postgres("s", "ns", spec)[0]["spec"]["template"]["spec"]["containers"]
        [flag, setting] = container["args"]
        assert flag == "-c"
        return int(setting.removeprefix("max_connections="))

    need = api.parse_spec({"singularity": {"replicas": 50}}).connection_budget().required
    assert max_connections(50) >= need > 100  # PostgreSQL's default would refuse them
    # Sized in steps of MANAGED_STEP: most changes of N (here 50 -> 51) do not restart PostgreSQL.
    assert max_connections(50) == max_connections(51)
    assert max_connections(50) % budget.MANAGED_STEP == 0
    assert max_connections(1) >= api.parse_spec({}).connection_budget().required


async def test_a_service_never_opens_more_than_its_pool_size(provision_stack, admin_dsn):
    result = provision_stack(1)
    role = result.layout.role("singularity_1")
    own_database = result.layout.database("singularity_1")
    with live_service(result, "singularity_1", POOL_SIZE="2") as service:
        headers = {"authorization": f"Bearer {SINGULARITY_TOKEN}"}
        async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=30) as http:
            # Enough requests at once that an unbounded pool would grow well past 2.
            for _ in range(5):
                answers = await asyncio.gather(*(http.get("/tasks") for _ in range(40)))
                assert {a.status_code for a in answers} == {200}
        with psycopg.connect(admin_dsn) as conn:
            rows = conn.execute(
                "SELECT datname, count(*) FROM pg_stat_activity WHERE usename = %s GROUP BY datname", (role,)
            ).fetchall()
    by_database = dict(rows)
    assert by_database[own_database] == 2  # the pool reached its cap under load, and not beyond
    assert sum(by_database.values()) <= 2 * 2 + budget.LISTEN_CONNECTIONS


# -- the operator, on a real API server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_client(kube) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kube.kubeconfig))


@pytest.fixture
def namespace(api_client) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    name = f"budget-{next(_namespaces)}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def controller(api_client: client.ApiClient, events: list[tuple[str, ...]]) -> StackController:
    return StackController(Kube(api_client), adopt=lambda obj: None, event=lambda *e: events.append(e))


def test_managed_postgres_gets_the_max_connections_of_50_instances(api_client, namespace):
    events: list[tuple[str, ...]] = []
    spec = {"singularity": {"replicas": 50}}
    controller(api_client, events).reconcile("fifty", namespace, spec)  # waits for PostgreSQL to run
    statefulset = client.AppsV1Api(api_client).read_namespaced_stateful_set("fifty-postgres", namespace)
    [container, _exporter] = statefulset.spec.template.spec.containers
    assert container.args == [
        "-c",
        f"max_connections={api.parse_spec(spec).connection_budget().managed_max_connections}",
    ]


@pytest.fixture
def small_server() -> Iterator[LocalCluster]:
    """An external server that admits 100 connections: room for two instances at the default pool sizes."""
    cluster = LocalCluster(
        Path(tempfile.mkdtemp(prefix="singularity-pg-")), settings={**FAST_SETTINGS, "max_connections": "100"}
    )
    cluster.start()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_an_external_server_too_small_for_more_instances_is_reported_and_nothing_is_added(
    api_client, namespace, small_server
):
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    secret = {"username": "postgres", "password": small_server.password}
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "pg-admin"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        },
    )
    external = {"host": "127.0.0.1", "port": small_server.port, "adminSecret": {"name": "pg-admin"}}
    events: list[tuple[str, ...]] = []
    operator = controller(api_client, events)

    one = operator.reconcile("small", namespace, {"postgres": {"external": external}})
    [provisioned] = [v for v in one.verdicts if v.type == "DatabasesReady"]
    assert provisioned.ok, provisioned.message
    three = operator.reconcile("small", namespace, {"postgres": {"external": external}, "singularity": {"replicas": 3}})
    [databases] = [v for v in three.verdicts if v.type == "DatabasesReady"]
    assert (databases.ok, databases.reason) == (False, "ConnectionBudgetExceeded")
    need = api.parse_spec({"singularity": {"replicas": 3}}).connection_budget().required
    assert f"max_connections >= {need}" in databases.message and "the server allows 100" in databases.message
    assert events[-1][:2] == ("Warning", "ConnectionBudgetExceeded")
    # Nothing was added for the instances that would not fit; the first one is still there.
    with psycopg.connect(small_server.dsn()) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    prefix = objects.database_prefix(namespace, "small")
    assert f"{prefix}singularity_1" in names and f"{prefix}singularity_2" not in names
    deployments = {d.metadata.name for d in apps.list_namespaced_deployment(namespace).items}
    assert "small-singularity-1" in deployments and "small-singularity-2" not in deployments


def test_connections_reserved_for_superusers_are_not_counted_as_the_stacks():
    """A server that keeps 20 of its 40 connections for superusers (superuser_reserved_connections) admits
    20 service connections, not 37: the budget is checked against what ordinary roles really get."""
    cluster = LocalCluster(
        Path(tempfile.mkdtemp(prefix="singularity-pg-")),
        settings={**FAST_SETTINGS, "max_connections": "40", "superuser_reserved_connections": "20"},
    )
    cluster.start()
    try:
        max_connections, reserved = budget.server_limits(cluster.dsn())
        assert (max_connections, reserved) == (40, 20)
        stack = budget.stack_budget(1, budget.PoolSizes(2, 2), headroom=0)  # 24 connections
        problem = budget.budget_problem(stack, max_connections, reserved)
        assert problem and "max_connections >= 44" in problem and "the server allows 40" in problem
        # what PostgreSQL really does: an ordinary role gets no more than 40 - 20
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("CREATE ROLE ordinary LOGIN PASSWORD 'pw'")
        opened: list[psycopg.Connection] = []
        try:
            with pytest.raises(psycopg.OperationalError, match="reserved"):
                for _ in range(stack.stack):
                    opened.append(psycopg.connect(cluster.dsn(), user="ordinary", password="pw"))
            assert len(opened) == max_connections - reserved < stack.stack
        finally:
            for conn in opened:
                conn.close()
    finally:
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_more_nexus_and_genesis_processes_count_their_own_pools():
    one = budget.stack_budget(1)
    more = budget.stack_budget(1, replicas={"nexus": 3, "genesis": 2})
    per_process = 2 * budget.SERVICE_POOL_SIZE + budget.LISTEN_CONNECTIONS
    assert more.stack - one.stack == 2 * (per_process + budget.LISTEN_CONNECTIONS) + 1 * per_process
