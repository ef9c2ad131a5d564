"""Operator benchmark: apply → databases provisioned and workloads created, for N Singularity instances;
and the API writes idle reconciles make (goal: 0).

    .venv/bin/python bench/operator_bench.py [--instances 1 10 50] [--samples 3] [--warmup 1] [--phases]

Runs a real kube-apiserver (scripts/build-kubernetes.sh builds it), a throwaway PostgreSQL, and the
operator in-process (kopf's KopfRunner) with a 2 s health timer, as a ServiceAccount of its own. The
sizes are measured interleaved (1, 10, 50, 1, 10, 50, ...; warm-up rounds discarded), each sample a new
stack (policy Delete, deleted after it), and reported as median and spread. Writes are counted as the
tests count them: every write request in the API server's audit log (ControlPlane(audit_writes=True)),
Events included; the idle windows end on the operator's own reconcile counter, not on a clock.

--provisioner-only: no API server nor operator: the Provisioner alone on the same PostgreSQL, a new stack's
first run and its rerun (which must change nothing) per N, interleaved, with --phases' breakdown if asked for.
The operator's own migrations are left out (migrate=False), as the operator now leaves them to each image.

--phases: where an apply's time goes. The provisioner's steps, its migrations and the operator's API calls are
timed (wall time, summed over the threads that ran them, so parallel work can add up to more than the sample)
and printed per N as the median over the samples.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from prometheus_client import REGISTRY
from samples import Samples, interleave

from singularity_operator import crd
from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack_testing.kube.apiserver import SERVICE_ACCOUNT_ISSUER, ControlPlane
from singularity_stack_testing.postgres import FAST_SETTINGS

GROUP, VERSION, PLURAL = "singularity.dev", "v1alpha1", "singularitystacks"
OPERATOR_SA = "bench-operator"
OPERATOR_USER = f"system:serviceaccount:default:{OPERATOR_SA}"
_names = itertools.count(1)


def wait(what: str, check: Callable[[], object], timeout: float = 600.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


class Phases:
    """Wall time spent in named functions, summed over calls and threads: `wrap` replaces them in place."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # the provisioner migrates on several threads

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}".rsplit(".", 2)[-2:]

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[".".join(label)] += time.monotonic() - started
                    self.calls[".".join(label)] += 1

        setattr(owner, name, timed)

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        with self._lock:
            return dict(self.seconds), dict(self.calls)


def timed_phases(operator: bool = True) -> Phases:
    """The steps an apply spends its time in: the provisioner's, each database's migrations, the API calls."""
    from singularity_operator import controller, kube
    from singularity_stack.provision import provisioner

    phases = Phases()
    for step in ("_roles_and_databases", "_shared_queue", "_create_queues", "_migrate"):
        if hasattr(provisioner.Provisioner, step):  # _create_queues: queues made on several connections
            phases.wrap(provisioner.Provisioner, step)
    for function in ("migrate", "applied_migrations"):  # the provisioner's own bindings, looked up at each call
        phases.wrap(provisioner, function)
    if not operator:
        return phases
    for step in ("provision", "apply_workloads", "live_deployments", "services_verdict", "_known_passwords"):
        phases.wrap(controller.StackController, step)
    for call in ("get", "apply", "list"):
        phases.wrap(kube.Kube, call)
    return phases


def reconciles() -> float:
    name = "singularity_operator_reconciles_total"
    return sum(REGISTRY.get_sample_value(name, {"result": r}) or 0.0 for r in ("ok", "not_ready", "error"))


class Bench:
    def __init__(self, plane: ControlPlane, postgres: LocalCluster) -> None:
        self.plane = plane
        self.postgres = postgres
        api_client = config.new_client_from_config(config_file=str(plane.kubeconfig))
        self.core, self.apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
        self.custom, self.rbac = client.CustomObjectsApi(api_client), client.RbacAuthorizationV1Api(api_client)
        self.extensions = client.ApiextensionsV1Api(api_client)
        self.writes_per_sample: dict[int, list[float]] = collections.defaultdict(list)  # by N
        self.phases: Phases | None = None
        # by N: per sample, (seconds, calls) spent in each phase
        self.phases_per_sample: dict[int, list[tuple[dict[str, float], dict[str, int]]]] = collections.defaultdict(list)

    def install(self) -> str:
        """The CRD, and the operator's own identity (cluster-admin): its writes are told from the bench's."""
        self.extensions.create_custom_resource_definition(crd.build_crd())
        wait("the CRD", self._crd_established, 60)
        self.core.create_namespaced_service_account("default", {"metadata": {"name": OPERATOR_SA}})
        binding = {
            "metadata": {"name": OPERATOR_SA},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": "default"}],
        }
        self.rbac.create_cluster_role_binding(binding)
        request = {"spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": 7200}}
        token = self.core.create_namespaced_service_account_token(OPERATOR_SA, "default", request).status.token
        path = self.plane.kubeconfig.with_name("operator.kubeconfig")
        return str(self.plane.kubeconfig_for(path, OPERATOR_USER, {"token": token}))

    def _crd_established(self) -> bool:
        found = self.extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in found.status.conditions or [])

    def create_stack(self, n: int) -> str:
        namespace = f"bench-{n}-{next(_names)}"
        self.core.create_namespace({"metadata": {"name": namespace}})
        password = self.postgres.password
        secret = {"metadata": {"name": "pg"}, "stringData": {"username": "postgres", "password": password}}
        self.core.create_namespaced_secret(namespace, secret)
        external = {"host": "127.0.0.1", "port": self.postgres.port, "adminSecret": {"name": "pg"}}
        spec = {"postgres": {"external": external}, "singularity": {"replicas": n}, "deletionPolicy": "Delete"}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SingularityStack", "metadata": {"name": "s"}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {**body, "spec": spec})
        return namespace

    def condition(self, namespace: str, kind: str) -> bool:
        status = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "s").get("status") or {}
        return any(c["type"] == kind and c["status"] == "True" for c in status.get("conditions", []))

    def provisioned(self, namespace: str, n: int) -> bool:
        return (
            self.condition(namespace, "DatabasesReady")
            and len(self.apps.list_namespaced_deployment(namespace).items) == n + 3
        )

    def wait_provisioned(self, namespace: str, n: int) -> None:
        try:
            wait(f"N = {n} provisioned", lambda: self.provisioned(namespace, n))
        except TimeoutError:
            stack = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "s")
            deployments = len(self.apps.list_namespaced_deployment(namespace).items)
            raise TimeoutError(f"N = {n}: {deployments} Deployments, status {stack.get('status')}") from None

    def make_available(self, namespace: str) -> None:
        """What a kubelet would do (none runs here): every Deployment reports itself available."""
        available = {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}}
        for deployment in self.apps.list_namespaced_deployment(namespace).items:
            self.apps.patch_namespaced_deployment_status(deployment.metadata.name, namespace, available)

    def delete_stack(self, namespace: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "s")

        def gone() -> bool:
            try:
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "s")
            except ApiException as error:
                return error.status == 404
            return False

        wait("the stack's deletion", gone)

    def apply_to_provisioned(self, n: int) -> Callable[[], float]:
        """One sample: seconds from the stack's creation to every database and Deployment there."""

        def measure() -> float:
            before = self.phases.snapshot() if self.phases else None
            started = time.monotonic()
            namespace = self.create_stack(n)
            self.wait_provisioned(namespace, n)
            seconds = time.monotonic() - started
            if self.phases and before:
                after = self.phases.snapshot()
                spent = {k: v - before[0].get(k, 0.0) for k, v in after[0].items()}
                calls = {k: v - before[1].get(k, 0) for k, v in after[1].items()}
                self.phases_per_sample[n].append((spent, calls))
            # the operator's writes in this stack's namespace until then (Events it is still posting excluded)
            writes = [w for w in self.plane.api_writes(OPERATOR_USER) if w["objectRef"].get("namespace") == namespace]
            self.writes_per_sample[n].append(len(writes))
            self.delete_stack(namespace)
            return seconds

        return measure

    def idle_window(self, stacks: int, ticks: int) -> tuple[list[dict[str, Any]], float]:
        """Every write (anyone's) while each of `stacks` idle stacks is reconciled about `ticks` times."""
        since, done, started = len(self.plane.api_writes()), reconciles(), time.monotonic()
        wait("the idle reconciles", lambda: reconciles() >= done + stacks * ticks, 120)
        return self.plane.api_writes()[since:], time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--idle-windows", type=int, default=3)
    parser.add_argument("--phases", action="store_true", help="print where each apply's time goes")
    parser.add_argument("--provisioner-only", action="store_true", help="time the Provisioner alone")
    args = parser.parse_args()
    # Every instance's pools count against max_connections (the provisioner refuses a stack that could
    # exhaust it): room for the largest N.
    connections = max(300, 12 * max(args.instances) + 100)
    datadir = Path(tempfile.mkdtemp(prefix="singularity-pg-"))
    postgres = LocalCluster(datadir, settings={**FAST_SETTINGS, "max_connections": str(connections)}).start()
    if args.provisioner_only:
        try:
            provisioner_only(postgres, args)
        finally:
            postgres.stop("immediate")
            shutil.rmtree(postgres.datadir, ignore_errors=True)
        return
    plane = ControlPlane(audit_writes=True).start()
    try:
        bench = Bench(plane, postgres)
        kubeconfig = bench.install()
        if args.phases:
            bench.phases = timed_phases()

        from kopf.testing import KopfRunner

        from singularity_operator import handlers
        from singularity_operator.config import OperatorConfig

        operator = handlers.register(OperatorConfig(kubeconfig=kubeconfig, health_interval_seconds=2, metrics_port=0))
        header = f"kube-apiserver 1.20.2 (no kubelet), PostgreSQL {postgres.installation.version}, operator in-process"
        runner = KopfRunner(["run", "--standalone", "--all-namespaces"], registry=operator)
        try:
            measured = run(bench, runner, args)
        except Exception:
            print(runner.output[-6000:])  # what the operator logged (KopfRunner captures it)
            raise
        report(header, args, bench, *measured)
    finally:
        plane.stop()
        postgres.stop("immediate")
        shutil.rmtree(postgres.datadir, ignore_errors=True)


Window = tuple[list[dict[str, Any]], float]


def provisioner_only(postgres: LocalCluster, args: argparse.Namespace) -> None:
    """A new stack's first run and its rerun per N, interleaved, on the Provisioner alone."""
    from singularity_stack.provision.provisioner import Provisioner
    from singularity_stack.topology import StackLayout

    phases = timed_phases(operator=False) if args.phases else None
    spent: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    reruns: dict[int, list[float]] = collections.defaultdict(list)

    def sample(n: int) -> Callable[[], float]:
        def measure() -> float:
            layout = StackLayout(n, f"p{next(_names)}_")
            before = phases.snapshot()[0] if phases else {}
            started = time.monotonic()
            first = Provisioner(postgres.dsn(), layout, report=lambda _: None, migrate=False).run()
            seconds = time.monotonic() - started
            if phases:
                spent[str(n)].append({k: v - before.get(k, 0.0) for k, v in phases.snapshot()[0].items()})
            started = time.monotonic()
            again = Provisioner(
                postgres.dsn(), layout, known_passwords=first.passwords, report=lambda _: None, migrate=False
            )
            if again.run().changes:
                raise AssertionError(f"N = {n}: the rerun changed something")
            reruns[n].append(time.monotonic() - started)
            return seconds

        return measure

    times = interleave({str(n): sample(n) for n in args.instances}, samples=args.samples, warmup=args.warmup)
    print(f"the Provisioner alone, PostgreSQL {postgres.installation.version} (fsync off), migrate=False:")
    for n in args.instances:
        rerun = Samples("rerun", reruns[n][args.warmup :])
        print(f"  N = {n:>3}: first run {times[str(n)].format('s', '{:.1f}')}; rerun {rerun.format('s', '{:.1f}')}")
        for name in sorted({k for found in spent[str(n)] for k in found}):
            step = Samples(name, [found.get(name, 0.0) for found in spent[str(n)][args.warmup :]])
            print(f"      {name:<40} {step.median:6.1f} s (median)")


def run(bench: Bench, runner: Any, args: argparse.Namespace) -> tuple[dict[str, Samples], list[Window], int]:
    with runner:
        measures = {str(n): bench.apply_to_provisioned(n) for n in args.instances}
        times = interleave(measures, samples=args.samples, warmup=args.warmup)
        # Idle: one Ready stack of each size, reconciled by the 2 s timer; the bench writes nothing meanwhile.
        idle_stacks = [(bench.create_stack(n), n) for n in args.instances]
        for namespace, n in idle_stacks:
            bench.wait_provisioned(namespace, n)
            bench.make_available(namespace)
        for namespace, _ in idle_stacks:
            wait("Ready", lambda namespace=namespace: bench.condition(namespace, "Ready"))
        bench.idle_window(len(idle_stacks), 1)  # let a tick pass after the last status write
        windows = [bench.idle_window(len(idle_stacks), 5) for _ in range(args.idle_windows)]
    return times, windows, len(idle_stacks)


def report(
    header: str, args: argparse.Namespace, bench: Bench, times: dict[str, Samples], windows: list[Window], stacks: int
) -> None:
    """Printed once the operator has stopped: KopfRunner captures stdout while it runs."""
    print(header)
    print(f"apply → databases provisioned and Deployments created ({args.samples} samples each, interleaved):")
    for n in args.instances:
        writes = Samples("writes", bench.writes_per_sample[n][args.warmup :])
        print(
            f"  N = {n:>3}: {n + 4} databases, {2 * (4 + 4 * n)} queues, {n + 3} Deployments: "
            f"{times[str(n)].format('s', '{:.1f}')}; API writes {writes.format()}"
        )
        measured = bench.phases_per_sample[n][args.warmup :]
        names = sorted({name for spent, _ in measured for name in spent}, key=lambda k: -measured[0][0].get(k, 0.0))
        for name in names:
            spent = Samples(name, [s.get(name, 0.0) for s, _ in measured])
            calls = statistics.median(c.get(name, 0) for _, c in measured)
            print(f"      {name:<40} {spent.median:6.1f} s in {calls:>6.0f} calls (median of {len(measured)})")
    anyone = Samples("anyone", [float(len(found)) for found, _ in windows])
    operator = [float(sum(w["user"]["username"] == OPERATOR_USER for w in found)) for found, _ in windows]
    spans = Samples("seconds", [span for _, span in windows])
    sizes = ", ".join(map(str, args.instances))
    print(
        f"idle: {stacks} Ready stacks (N = {sizes}), 5 health checks each per window ({spans.format('s', '{:.1f}')}):"
    )
    print(f"  API writes per window, anyone's: {anyone.format()}; the operator's: {Samples('op', operator).format()}")
    print("  (the API server's own: its endpoints reconciler retries the `kubernetes` Endpoints it cannot create here)")
    kinds = collections.Counter(
        f"{w['user']['username']}: {w['verb']} {w['objectRef'].get('resource', '?')}"
        for found, _ in windows
        for w in found
    )
    for what, count in kinds.most_common():
        print(f"    {count} x {what}")


if __name__ == "__main__":
    main()
