"""Pure functions that build a stack's Kubernetes objects from its spec. No API calls here.

Every object carries the stack's labels; the controller adds owner references (`kopf.adopt`).
Each Singularity instance is its own Deployment bound to its own Secret (and so its own
database), so lowering N removes workloads without touching any data.
"""

from __future__ import annotations

from typing import Any

from singularity_operator import api
from singularity_stack.provision.budget import pool_size_for
from singularity_stack.provision.migrations import service_kind
from singularity_stack.topology import instance_id

Manifest = dict[str, Any]
HTTP_PORT = 8000
POSTGRES_PORT = 5432
POSTGRES_METRICS_PORT = 9187  # prometheus-postgres-exporter, beside managed PostgreSQL
APP = "singularity-stack"
SERVICE_UID = 10001
ROUTING_MOUNT = "/etc/singularity/routing"
REVIEWERS_MOUNT = "/etc/singularity/reviewers"
REVIEWERS_KEY = "reviewers.json"
CLUSTER_DOMAIN = "cluster.local"
RUNTIME_DEFAULT_SECCOMP = {"type": "RuntimeDefault"}
MANAGED_BY = "singularity-operator"


# -- names and labels ---------------------------------------------------------------------------------


def labels(stack: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": stack,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def stack_selector(stack: str) -> str:
    """A label selector for every object the operator made for `stack`."""
    return f"app.kubernetes.io/instance={stack},app.kubernetes.io/managed-by={MANAGED_BY}"


def selector(stack: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": stack, "app.kubernetes.io/component": component}


def component_of(logical: str) -> str:
    """`singularity_3` → `singularity-3` (Kubernetes names allow no underscores)."""
    return logical.replace("_", "-")


def object_name(stack: str, logical: str) -> str:
    return f"{stack}-{component_of(logical)}"


def credentials_secret_name(stack: str, logical: str) -> str:
    return f"{object_name(stack, logical)}-db"


def postgres_name(stack: str) -> str:
    return f"{stack}-postgres"


def admin_secret_name(stack: str) -> str:
    """Holds POSTGRES_PASSWORD (generated once) for the managed server's `postgres` superuser."""
    return f"{stack}-postgres-admin"


def ui_secret_name(stack: str) -> str:
    return f"{stack}-nexus-ui"


def reviewers_secret_name(stack: str) -> str:
    """The HITL UI's named reviewers (REVIEWERS_KEY: {name: token hash}); the admin fills it with kubectl."""
    return f"{stack}-nexus-reviewers"


# Bearer tokens of the HTTP APIs: the Secret that holds each (generated once) and its key, by service.
API_TOKEN_KEYS = {"singularity": "SINGULARITY_API_TOKEN", "centralcloud": "CENTRALCLOUD_API_TOKEN"}


def api_token_secret_name(stack: str, service: str) -> str:
    """One token per service (all Singularity instances share theirs): analytics readers cannot create tasks."""
    return f"{stack}-{service}-api"


def allowed_hosts(stack: str, namespace: str, logical: str) -> str:
    """ALLOWED_HOSTS: the Service's DNS names, the pod's own IP (kubelet's probes) and loopback."""
    name = object_name(stack, logical)
    names = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"]
    return ",".join([*names, "$(POD_IP)", "localhost", "127.0.0.1"])


def database_prefix(namespace: str, stack: str) -> str:
    """Databases and roles of a stack on a shared server are prefixed; a managed server is the stack's own."""
    return f"{namespace}_{stack}_".replace("-", "_")


def _meta(stack: str, namespace: str, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(stack, component)}


# -- secrets ------------------------------------------------------------------------------------------


def credentials_secret(stack: str, namespace: str, logical: str, urls: dict[str, str]) -> Manifest:
    """The design's DATABASE_URL and SHARED_QUEUE_DB_URL (plus the analytics URL for CentralCloud)."""
    data = {"DATABASE_URL": urls["database_url"], "SHARED_QUEUE_DB_URL": urls["shared_queue_url"]}
    if urls.get("shared_queue_analytics_url"):
        data["SHARED_QUEUE_ANALYTICS_URL"] = urls["shared_queue_analytics_url"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(stack, namespace, credentials_secret_name(stack, logical), component_of(logical)),
        "type": "Opaque",
        "stringData": data,
    }


def generated_secret(stack: str, namespace: str, name: str, component: str, values: dict[str, str]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(stack, namespace, name, component),
        "type": "Opaque",
        "stringData": values,
    }


# -- workloads ----------------------------------------------------------------------------------------


def _resources(resources: api.Resources) -> dict[str, Any]:
    return {k: v for k, v in (("requests", resources.requests), ("limits", resources.limits)) if v}


def _container(
    spec: api.StackSpec, service: api.ServiceSpec, role: str, env: list[dict[str, Any]], hosts: str
) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6}
    address = [
        {"name": "HOST", "value": "0.0.0.0"},
        {"name": "PORT", "value": str(HTTP_PORT)},
        # Before ALLOWED_HOSTS, which names it as $(POD_IP): kubelet probes the pod by its IP.
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "ALLOWED_HOSTS", "value": hosts},
    ]
    return {
        "name": role,
        "image": spec.image_of(service),
        "imagePullPolicy": spec.image_pull_policy,
        "args": ["run", role],
        "ports": [{"name": "http", "containerPort": HTTP_PORT}],
        "env": [*address, *env],
        "resources": _resources(service.resources),
        "livenessProbe": probe,
        "readinessProbe": {**probe, "httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _secret_env(secret: str, *keys: str) -> list[dict[str, Any]]:
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in keys]


def _deployment(
    stack: str,
    namespace: str,
    logical: str,
    container: dict[str, Any],
    pod_extra: dict[str, Any] | None = None,
    replicas: int = 1,
) -> Manifest:
    component = component_of(logical)
    pod_security = {
        "runAsNonRoot": True,
        "runAsUser": SERVICE_UID,
        "runAsGroup": SERVICE_UID,
        "fsGroup": SERVICE_UID,
        "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP),  # the restricted Pod Security Standard asks for it
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(stack, namespace, object_name(stack, logical), component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(stack, component)},
            # A new pod must be ready before the old one goes: an upgrade keeps the service answering (two
            # pods of one instance may consume at once for a moment; claims and idempotency keep that safe).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels(stack, component)},
                "spec": {
                    "serviceAccountName": stack,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    **(pod_extra or {}),
                },
            },
        },
    }


NATS_URL_KEY = "url"  # in spec.messaging.natsSecret, when spec.messaging.natsUrl is unset


def _messaging_env(spec: api.StackSpec, logical: str, prefix: str) -> list[dict[str, Any]]:
    """The migration from NATS: the mode, the nats-server, the service's own NATS password (its key in the
    Secret is its logical name) and the stack's names, which NATS subjects carry. Nothing in pgmq mode."""
    messaging = spec.messaging
    if messaging.mode is api.MessagingMode.PGMQ:
        return []
    assert messaging.nats_secret  # MessagingSpec's check
    secret = messaging.nats_secret
    url: dict[str, Any] = (
        {"value": messaging.nats_url}
        if messaging.nats_url
        else {"valueFrom": {"secretKeyRef": {"name": secret, "key": NATS_URL_KEY}}}
    )
    env: list[dict[str, Any]] = [
        {"name": "MESSAGING_MODE", "value": messaging.mode.value},
        {"name": "NATS_URL", **url},
        {"name": "NATS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": logical}}},
    ]
    if logical != "centralcloud":  # CentralCloud has them already (its queues)
        env += [
            {"name": "SINGULARITY_INSTANCES", "value": str(spec.singularity.replicas)},
            {"name": "STACK_PREFIX", "value": prefix},
        ]
    if logical.startswith("singularity_"):
        env.append({"name": "SINGULARITY_PUBLISH_TO", "value": messaging.singularity_publish_to.value})
    return env


def service_deployments(stack: str, namespace: str, spec: api.StackSpec) -> list[Manifest]:
    """Nexus, Genesis, CentralCloud and one Deployment per Singularity instance."""

    def db(logical: str) -> list[dict[str, Any]]:
        return _secret_env(credentials_secret_name(stack, logical), "DATABASE_URL", "SHARED_QUEUE_DB_URL")

    prefix = database_prefix(namespace, stack) if spec.postgres.external else ""

    def migrate(logical: str, main: dict[str, Any]) -> dict[str, Any]:
        """The pod's init container: this image's migrations of its database, as its role, before the
        service starts (a new stack or instance on a newer image gets that image's schema; an upgrade's
        Job has already applied them, so here it finds nothing to do)."""
        return {
            "name": "migrate",
            "image": main["image"],
            "imagePullPolicy": main["imagePullPolicy"],
            "args": ["migrate", service_kind(logical)],
            "env": _secret_env(credentials_secret_name(stack, logical), "DATABASE_URL"),
            "resources": main["resources"],
            # the pod's RuntimeDefault seccomp, whatever the service's own container needs (Genesis)
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }

    def container(service: api.ServiceSpec, logical: str, env: list[dict[str, Any]]) -> dict[str, Any]:
        role = "singularity" if logical.startswith("singularity_") else logical
        if role in API_TOKEN_KEYS:
            env = [*env, *_secret_env(api_token_secret_name(stack, role), API_TOKEN_KEYS[role])]
        # The pool sizes the connection budget (and so managed PostgreSQL's max_connections) counts on.
        env = [*env, {"name": "POOL_SIZE", "value": str(pool_size_for(logical, spec.connections.pools()))}]
        env = [*env, *_messaging_env(spec, logical, prefix)]
        return _container(spec, service, role, env, allowed_hosts(stack, namespace, logical))

    nexus_env = [*db("nexus"), *_secret_env(ui_secret_name(stack), "NEXUS_UI_TOKEN")]
    nexus_env.append({"name": "NEXUS_REVIEWERS_FILE", "value": f"{REVIEWERS_MOUNT}/{REVIEWERS_KEY}"})
    nexus = container(spec.nexus, "nexus", nexus_env)
    # The whole Secret as a directory, not a subPath: kubelet then updates the file in place when the
    # admin changes the Secret, and Nexus rereads it. Optional: Nexus starts before it exists.
    reviewers_volume = {
        "name": "reviewers",
        "secret": {"secretName": reviewers_secret_name(stack), "optional": True, "defaultMode": 0o440},
    }
    nexus["volumeMounts"] = [{"name": "reviewers", "mountPath": REVIEWERS_MOUNT, "readOnly": True}]
    nexus_pod: dict[str, Any] = {"volumes": [reviewers_volume]}
    if spec.nexus.provider_keys_secret:
        nexus["envFrom"] = [{"secretRef": {"name": spec.nexus.provider_keys_secret, "optional": True}}]
    if spec.nexus.routing_config_map:
        ref = spec.nexus.routing_config_map
        nexus["env"].append({"name": "NEXUS_ROUTING_CONFIG", "value": f"{ROUTING_MOUNT}/{ref.key}"})
        nexus["volumeMounts"].append({"name": "routing", "mountPath": ROUTING_MOUNT, "readOnly": True})
        nexus_pod["volumes"].append({"name": "routing", "configMap": {"name": ref.name}})

    genesis_env = [
        *db("genesis"),
        {"name": "GENESIS_MAX_CONCURRENT_JOBS", "value": str(spec.genesis.max_concurrent_jobs)},
    ]
    pod_sandbox = spec.genesis.sandbox is api.GenesisSandbox.POD
    if pod_sandbox:
        genesis_env += genesis_pod_sandbox_env(stack, spec)
    genesis = container(spec.genesis, "genesis", genesis_env)
    genesis_pod: dict[str, Any] = {}
    if pod_sandbox:
        # Jobs run in Pods of their own: Genesis needs no user namespaces (the Pod's RuntimeDefault holds), but
        # its own ServiceAccount's token, whose Role lets it manage job Pods in this namespace and nothing else.
        genesis_pod = {"serviceAccountName": genesis_service_account_name(stack), "automountServiceAccountToken": True}
    else:
        # bubblewrap creates user namespaces for each job, which the runtime's default seccomp profile forbids:
        # Unconfined, or the chart's Localhost profile (the default plus what bubblewrap needs), by spec.
        genesis["securityContext"]["seccompProfile"] = spec.genesis.seccomp_profile.model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )

    central_env = [
        *db("centralcloud"),
        *_secret_env(credentials_secret_name(stack, "centralcloud"), "SHARED_QUEUE_ANALYTICS_URL"),
        {"name": "SHARED_QUEUE_RETENTION_DAYS", "value": str(spec.centralcloud.retention_days)},
        {"name": "SINGULARITY_INSTANCES", "value": str(spec.singularity.replicas)},
        {"name": "STACK_PREFIX", "value": prefix},
    ]
    deployments = [
        _deployment(stack, namespace, "centralcloud", container(spec.centralcloud, "centralcloud", central_env)),
        _deployment(stack, namespace, "nexus", nexus, nexus_pod, replicas=spec.nexus.replicas),
        _deployment(stack, namespace, "genesis", genesis, genesis_pod, replicas=spec.genesis.replicas),
    ]
    for index in range(1, spec.singularity.replicas + 1):
        logical = instance_id(index)
        env = [*db(logical), {"name": "SINGULARITY_INSTANCE", "value": logical}]
        deployments.append(_deployment(stack, namespace, logical, container(spec.singularity, logical, env)))
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        logical = deployment["metadata"]["labels"]["app.kubernetes.io/component"].replace("-", "_")
        pod["initContainers"] = [migrate(logical, pod["containers"][0])]
    return deployments


def http_services(stack: str, namespace: str, spec: api.StackSpec) -> list[Manifest]:
    logicals = ["centralcloud", "nexus", "genesis", *(instance_id(i) for i in range(1, spec.singularity.replicas + 1))]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(stack, namespace, object_name(stack, logical), component_of(logical)),
            "spec": {
                "selector": selector(stack, component_of(logical)),
                "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}],
            },
        }
        for logical in logicals
    ]


# -- Genesis's sandbox: pod ---------------------------------------------------------------------------------

GENESIS_JOB_COMPONENT = "genesis-job"  # the job Pods' component label (genesis/pod_sandbox.py sets it)
KUBE_API_PORTS = (443, 6443)  # the API server, as the kubernetes Service's port and as its endpoints'
# The chart's ClusterRole of what Genesis may do with job Pods (templates/rbac.yaml), bound per stack namespace.
GENESIS_JOBS_CLUSTER_ROLE = "singularity-genesis-jobs"


def genesis_service_account_name(stack: str) -> str:
    return f"{stack}-genesis"


def genesis_jobs_name(stack: str) -> str:
    return f"{stack}-genesis-jobs"


def genesis_job_selector(stack: str) -> dict[str, str]:
    return selector(stack, GENESIS_JOB_COMPONENT)


def genesis_pod_sandbox_env(stack: str, spec: api.StackSpec) -> list[dict[str, Any]]:
    """What Genesis needs to run each job in a Pod: the image, namespace, RuntimeClass, labels, its own Pod."""
    labels = ",".join(f"{k}={v}" for k, v in labels_of_jobs(stack).items())

    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        {"name": "GENESIS_SANDBOX", "value": "pod"},
        {"name": "GENESIS_JOB_IMAGE", "value": spec.genesis.job_image or spec.image_of(spec.genesis)},
        {"name": "GENESIS_JOB_IMAGE_PULL_POLICY", "value": spec.image_pull_policy},
        {"name": "GENESIS_JOB_NAMESPACE", **field("metadata.namespace")},
        {"name": "GENESIS_RUNTIME_CLASS", "value": spec.genesis.runtime_class_name or ""},
        {"name": "GENESIS_JOB_LABELS", "value": labels},
        {"name": "POD_NAME", **field("metadata.name")},
        {"name": "POD_UID", **field("metadata.uid")},
    ]


def labels_of_jobs(stack: str) -> dict[str, str]:
    return labels(stack, GENESIS_JOB_COMPONENT)


def genesis_pod_sandbox(stack: str, namespace: str) -> list[Manifest]:
    """Genesis's ServiceAccount; a RoleBinding, in the stack's namespace, of the chart's ClusterRole that lets
    it create, watch, read the logs of and delete Pods (GENESIS_JOBS_CLUSTER_ROLE): so Genesis can do that in
    its namespace and nothing else, and the operator itself holds only `bind` on that one ClusterRole, never a
    Pod write; and the NetworkPolicy that gives job Pods no network at all."""
    name, jobs = genesis_service_account_name(stack), genesis_jobs_name(stack)
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(stack, namespace, name, "genesis"),
            "automountServiceAccountToken": False,  # only Genesis's Pod mounts it (service_deployments)
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": _meta(stack, namespace, jobs, "genesis"),
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": GENESIS_JOBS_CLUSTER_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(stack, namespace, jobs, GENESIS_JOB_COMPONENT),
            "spec": {
                "podSelector": {"matchLabels": genesis_job_selector(stack)},
                "policyTypes": ["Ingress", "Egress"],  # and no rule of either: nothing in, nothing out
            },
        },
    ]


def service_account(stack: str, namespace: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(stack, namespace, stack, "services"),
        "automountServiceAccountToken": False,
    }


# -- managed PostgreSQL ---------------------------------------------------------------------------------


def managed_postgres(stack: str, namespace: str, spec: api.StackSpec) -> list[Manifest]:
    assert spec.postgres.managed is not None
    managed = spec.postgres.managed
    name = postgres_name(stack)
    # Sized for the most the stack's pools may open (provision/budget.py), in steps of 100 so that a few
    # more instances do not restart PostgreSQL.
    max_connections = spec.connection_budget().managed_max_connections
    claim: dict[str, Any] = {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": managed.storage}}},
    }
    if managed.storage_class_name:
        claim["spec"]["storageClassName"] = managed.storage_class_name
    container = {
        "name": "postgres",
        "image": managed.image,
        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT}],
        "env": [
            {"name": "POSTGRES_USER", "value": "postgres"},
            *_secret_env(admin_secret_name(stack), "POSTGRES_PASSWORD"),
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
        ],
        "args": ["-c", f"max_connections={max_connections}"],
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
        "resources": _resources(managed.resources),
        "readinessProbe": {
            "exec": {"command": ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-U", "postgres"]},
            "periodSeconds": 5,
        },
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    # PostgreSQL's own metrics (connections, sizes, locks, replication) for a team's Prometheus, from
    # Debian's exporter in the same image; it connects over loopback, so it needs no network policy to reach it.
    exporter = {
        "name": "metrics",
        "image": managed.image,
        "command": ["/usr/bin/prometheus-postgres-exporter", f"--web.listen-address=:{POSTGRES_METRICS_PORT}"],
        "env": [
            {"name": "DATA_SOURCE_URI", "value": f"127.0.0.1:{POSTGRES_PORT}/postgres?sslmode=disable"},
            {"name": "DATA_SOURCE_USER", "value": "postgres"},
            {
                "name": "DATA_SOURCE_PASS",
                "valueFrom": {"secretKeyRef": {"name": admin_secret_name(stack), "key": "POSTGRES_PASSWORD"}},
            },
        ],
        "ports": [{"name": "metrics", "containerPort": POSTGRES_METRICS_PORT}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _meta(stack, namespace, name, "postgres"),
            "spec": {
                "serviceName": name,
                "replicas": 1,
                "selector": {"matchLabels": selector(stack, "postgres")},
                "template": {
                    "metadata": {"labels": labels(stack, "postgres")},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 999,
                            "fsGroup": 999,
                            "fsGroupChangePolicy": "OnRootMismatch",
                            "seccompProfile": dict(RUNTIME_DEFAULT_SECCOMP),
                        },
                        "containers": [container, exporter],
                    },
                },
                "volumeClaimTemplates": [claim],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(stack, namespace, name, "postgres"),
            "spec": {
                "selector": selector(stack, "postgres"),
                "ports": [
                    {"name": "postgres", "port": POSTGRES_PORT, "targetPort": "postgres"},
                    {"name": "metrics", "port": POSTGRES_METRICS_PORT, "targetPort": "metrics"},
                ],
            },
        },
    ]


# -- network policies -------------------------------------------------------------------------------------


def _to_postgres(stack: str, spec: api.StackSpec) -> dict[str, Any]:
    if spec.postgres.external:
        # An external server's address is not a pod; allow its port wherever it lives.
        return {"ports": [{"protocol": "TCP", "port": spec.postgres.external.port}]}
    return {
        "to": [{"podSelector": {"matchLabels": selector(stack, "postgres")}}],
        "ports": [{"protocol": "TCP", "port": POSTGRES_PORT}],
    }


DNS = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def network_policies(stack: str, namespace: str, spec: api.StackSpec) -> list[Manifest]:
    """Each service reaches PostgreSQL (and DNS) and nothing else, except Nexus, which also reaches LLM
    providers over HTTPS. Genesis's jobs get no network at all from their sandbox; the service itself
    needs PostgreSQL, for the queue."""

    def policy(name: str, pod_selector: dict[str, Any], ingress: list[Any], egress: list[Any]) -> Manifest:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(stack, namespace, f"{stack}-{name}", name),
            "spec": {
                "podSelector": pod_selector,
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        }

    in_stack = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": stack}}}
    http_in = [{"ports": [{"protocol": "TCP", "port": HTTP_PORT}]}]
    base_egress = [_to_postgres(stack, spec), DNS]
    if spec.messaging.mode is not api.MessagingMode.PGMQ:  # the platform's nats-server, wherever it runs
        base_egress.append({"ports": [{"protocol": "TCP", "port": spec.messaging.egress_port()}]})
    genesis_egress = list(base_egress)
    if spec.genesis.sandbox is api.GenesisSandbox.POD:  # the API server, for its job Pods
        genesis_egress.append({"ports": [{"protocol": "TCP", "port": port} for port in KUBE_API_PORTS]})
    policies = [
        policy(
            "singularity",
            {
                "matchLabels": {"app.kubernetes.io/instance": stack},
                "matchExpressions": [
                    {
                        "key": "app.kubernetes.io/component",
                        "operator": "In",
                        "values": [component_of(instance_id(i)) for i in range(1, spec.singularity.replicas + 1)],
                    }
                ],
            },
            http_in,
            base_egress,
        ),
        policy(
            "nexus",
            {"matchLabels": selector(stack, "nexus")},
            http_in,
            [*base_egress, {"ports": [{"protocol": "TCP", "port": 443}]}],
        ),
        policy("genesis", {"matchLabels": selector(stack, "genesis")}, http_in, genesis_egress),
        policy("centralcloud", {"matchLabels": selector(stack, "centralcloud")}, http_in, base_egress),
    ]
    if spec.postgres.managed:
        policies.append(
            policy(
                "postgres",
                {"matchLabels": selector(stack, "postgres")},
                # the stack's services, and the operator that provisions (it runs in another namespace)
                [
                    {
                        "from": [
                            in_stack,
                            {
                                "namespaceSelector": {},
                                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "singularity-operator"}},
                            },
                        ],
                        "ports": [{"protocol": "TCP", "port": POSTGRES_PORT}],
                    },
                    # metrics only, from wherever the team's Prometheus runs (like the services' /metrics)
                    {"ports": [{"protocol": "TCP", "port": POSTGRES_METRICS_PORT}]},
                ],
                [],
            )
        )
    return policies


def workloads(stack: str, namespace: str, spec: api.StackSpec) -> list[Manifest]:
    """Everything but secrets: the operator writes those only when missing."""
    objects = [service_account(stack, namespace)]
    if spec.genesis.sandbox is api.GenesisSandbox.POD:
        objects += genesis_pod_sandbox(stack, namespace)
    if spec.postgres.managed:
        objects += managed_postgres(stack, namespace, spec)
    return (
        objects
        + service_deployments(stack, namespace, spec)
        + http_services(stack, namespace, spec)
        + network_policies(stack, namespace, spec)
    )
