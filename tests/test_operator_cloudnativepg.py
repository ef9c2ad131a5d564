"""An `external` stack on a CloudNativePG cluster: its `<cluster>-superuser` Secret, exactly as CloudNativePG
writes it (type basic-auth, these keys), is read as is — no copying credentials into another shape."""

from __future__ import annotations

import base64

from kubernetes import client, config

from singularity_operator.controller import StackController
from singularity_operator.kube import Kube


def cloudnativepg_superuser_secret(cluster: str, host: str, port: int, password: str) -> dict:
    values = {
        "username": "postgres",
        "user": "postgres",
        "password": password,
        "dbname": "*",
        "host": f"{cluster}-rw",
        "port": str(port),
        "uri": f"postgresql://postgres:{password}@{cluster}-rw:{port}/*",
        "jdbc-uri": f"jdbc:postgresql://{cluster}-rw:{port}/*?password={password}&user=postgres",
        "pgpass": f"{cluster}-rw:{port}:*:postgres:{password}\n",
    }
    return {
        "metadata": {"name": f"{cluster}-superuser", "labels": {"cnpg.io/cluster": cluster, "cnpg.io/reload": "true"}},
        "type": "kubernetes.io/basic-auth",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    }


def test_a_stack_provisions_on_a_cloudnativepg_superuser_secret(kube, pg_cluster):
    api_client = config.new_client_from_config(config_file=str(kube.kubeconfig))
    core = client.CoreV1Api(api_client)
    namespace = "cnpg-team"
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        secret = cloudnativepg_superuser_secret("pg", pg_cluster.host, pg_cluster.port, pg_cluster.password)
        core.create_namespaced_secret(namespace, secret)
        # On a real cluster the host is the `-rw` Service, `pg-rw`; here the server listens on loopback.
        spec = {
            "postgres": {
                "external": {"host": pg_cluster.host, "port": pg_cluster.port, "adminSecret": {"name": "pg-superuser"}}
            }
        }
        controller = StackController(Kube(api_client), adopt=lambda obj: None, event=lambda *e: None)
        outcome = controller.reconcile("agents", namespace, spec)
        verdicts = {v.type: v for v in outcome.verdicts}
        assert verdicts["DatabasesReady"].ok and verdicts["QueueReady"].ok, verdicts
        # no database migrated by the operator: each waits for its pods' init container
        migrated = verdicts["MigrationsSucceeded"]
        assert (migrated.ok, migrated.reason) == (None, "AwaitingInitContainers"), migrated
    finally:
        core.delete_namespace(namespace)
