"""Operator benchmark: apply → databases provisioned and workloads created, for N Singularity instances;
and the API writes an idle reconcile makes (goal: 0).

    .venv/bin/python bench/operator_bench.py [--instances 1 10 50]

Runs a real kube-apiserver (scripts/build-kubernetes.sh builds it), a throwaway PostgreSQL, and the
operator in-process (kopf's KopfRunner) with a 2 s health timer. The API writes are counted from outside,
in the API server's audit log (ControlPlane(audit_writes=True)): every write by the operator's user.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import time

from kubernetes import client, config

from singularity_operator import crd
from singularity_stack_testing.kube.apiserver import ControlPlane
from singularity_stack_testing.postgres import throwaway_cluster

GROUP, VERSION, PLURAL = "singularity.dev", "v1alpha1", "singularitystacks"


def wait(check, timeout: float = 600.0) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError("gave up waiting")
        time.sleep(0.1)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 10, 50])
    args = parser.parse_args()
    postgres = throwaway_cluster().start()
    plane = ControlPlane(audit_writes=True).start()
    try:
        api_client = config.new_client_from_config(config_file=str(plane.kubeconfig))
        client.ApiextensionsV1Api(api_client).create_custom_resource_definition(crd.build_crd())
        time.sleep(2)
        core, apps, custom = (
            client.CoreV1Api(api_client),
            client.AppsV1Api(api_client),
            client.CustomObjectsApi(api_client),
        )

        from kopf.testing import KopfRunner

        from singularity_operator import handlers
        from singularity_operator.config import OperatorConfig

        operator = handlers.register(
            OperatorConfig(kubeconfig=plane.kubeconfig, health_interval_seconds=2, metrics_port=0)
        )

        print(f"kube-apiserver 1.20.2 (no kubelet), PostgreSQL {postgres.installation.version}, operator in-process")
        lines: list[str] = []
        with KopfRunner(["run", "--standalone", "--all-namespaces"], registry=operator):
            for n in args.instances:
                namespace = f"bench-{n}"
                core.create_namespace({"metadata": {"name": namespace}})
                core.create_namespaced_secret(
                    namespace,
                    {"metadata": {"name": "pg"}, "stringData": {"username": "postgres", "password": postgres.password}},
                )
                spec = {
                    "postgres": {
                        "external": {"host": "127.0.0.1", "port": postgres.port, "adminSecret": {"name": "pg"}}
                    },
                    "singularity": {"replicas": n},
                }
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SingularityStack",
                    "metadata": {"name": "s"},
                    "spec": spec,
                }
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

                def provisioned(namespace: str = namespace, n: int = n) -> bool:
                    status = (
                        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "s").get("status") or {}
                    )
                    done = any(
                        c["type"] == "DatabasesReady" and c["status"] == "True" for c in status.get("conditions", [])
                    )
                    return done and len(apps.list_namespaced_deployment(namespace).items) == n + 3

                seconds = wait(provisioned)
                queues = 2 * (4 + 4 * n)
                lines.append(
                    f"  N = {n:>3}: {n + 4} databases, {queues} queues, {n + 3} Deployments in {seconds:6.1f} s"
                )
            time.sleep(3)  # let every stack's first timer pass
            # The bench writes nothing from here on: whatever the operator's user (the admin) writes is the operator's.
            before = len(plane.api_writes(plane.admin_user))
            time.sleep(10)  # five idle health checks per stack
            idle = plane.api_writes(plane.admin_user)[before:]
            lines.append(
                f"  API writes by idle reconciles of {len(args.instances)} stacks over 10 s: {len(idle)} (goal: 0)"
            )
            kinds = collections.Counter(f"{w['verb']} {w['objectRef'].get('resource', '?')}" for w in idle)
            lines.extend(f"    {count} x {what}" for what, count in kinds.most_common())
        # KopfRunner captures stdout while the operator runs: report afterwards.
        print("\n".join(lines))
    finally:
        plane.stop()
        postgres.stop("immediate")
        shutil.rmtree(postgres.datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
