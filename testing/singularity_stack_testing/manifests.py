"""Every object the chart renders and the operator builds, under every option that changes them.

The Pod Security and Kubernetes-schema tests check these: each case is (label, objects), the label saying
which values or spec produced them, so a failure names the option that asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native as helm_native

from singularity_operator import api, backup_objects, migration_jobs, objects
from singularity_stack.genesis import pod_sandbox
from singularity_stack.genesis.languages import get_language
from singularity_stack.genesis.sandbox import Limits

from . import ROOT

CHART = ROOT / "charts" / "singularity-stack"
Manifest = dict[str, Any]
LOCALHOST_PROFILE = "singularity-stack/genesis-bubblewrap-seccomp.json"

# Values that change what the chart renders (the CRD, RBAC scope, monitoring, the ServiceAccount, scheduling).
CHART_VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watchNamespaces=[team-a, team-b], crds.create=false": {
        "watchNamespaces": ["team-a", "team-b"],
        "crds": {"create": False},
    },
    "monitoring all enabled": {
        "monitoring": {
            "podMonitors": {"enabled": True, "labels": {"release": "kps"}},
            "rules": {"enabled": True},
            "dashboard": {"enabled": True},
        }
    },
    "serviceAccount.create=false, scheduling": {
        "serviceAccount": {"create": False, "name": "ops-sa"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]
                }
            }
        },
        "image": {"repository": "registry.example/singularity-stack", "tag": "1.2.3", "pullPolicy": "Always"},
    },
}

_EXTERNAL = {"external": {"host": "db.example", "adminSecret": {"name": "pg-admin"}, "sslMode": "require"}}
# Specs that change what the operator builds; the label is the option, as written in a SingularityStack.
STACK_SPECS: dict[str, dict[str, Any]] = {
    "defaults (spec.genesis.seccompProfile.type=Unconfined)": {},
    "spec.genesis.seccompProfile.type=Localhost": {
        "genesis": {"seccompProfile": {"type": "Localhost", "localhostProfile": LOCALHOST_PROFILE}}
    },
    "spec.postgres.external, every service option": {
        "postgres": _EXTERNAL,
        "image": "registry.example/stack:1",
        "imagePullPolicy": "Always",
        "singularity": {"replicas": 3, "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "1Gi"}}},
        "nexus": {
            "routingConfigMap": {"name": "routing", "key": "routing.yaml"},
            "providerKeysSecret": "llm-keys",
            "image": "registry.example/nexus:2",
        },
        "genesis": {
            "maxConcurrentJobs": 8,
            "seccompProfile": {"type": "Localhost", "localhostProfile": LOCALHOST_PROFILE},
        },
        "centralcloud": {"retentionDays": 7},
        "deletionPolicy": "Delete",
    },
    "spec.postgres.managed with storageClassName and resources": {
        "postgres": {
            "managed": {
                "storage": "5Gi",
                "storageClassName": "fast",
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            }
        },
    },
    "spec.backup and spec.postgres.managed.restoreFrom, replicas": {
        "postgres": {"managed": {"restoreFrom": {"claimName": "old-backups", "backup": "20260101T020000Z"}}},
        "backup": {"schedule": "@daily", "retention": 3, "volume": {"storageClassName": "slow", "size": "10Gi"}},
        "nexus": {"replicas": 2},
        "genesis": {"replicas": 3, "seccompProfile": {"type": "Localhost", "localhostProfile": LOCALHOST_PROFILE}},
    },
    "spec.genesis.sandbox=pod, runtimeClassName, jobImage": {
        "genesis": {"sandbox": "pod", "runtimeClassName": "gvisor", "jobImage": "registry.example/jobs:1"},
    },
    "spec.messaging dual, the NATS URL and passwords from a Secret": {
        "singularity": {"replicas": 2},
        "genesis": {"seccompProfile": {"type": "Localhost", "localhostProfile": LOCALHOST_PROFILE}},
        "messaging": {"mode": "dual", "natsSecret": "nats-users", "natsPort": 4333, "singularityPublishTo": "both"},
    },
}


def render_templates(
    values: dict[str, Any], kube_version: str | None = None, name: str = "ops", namespace: str = "operators"
) -> dict[str, str]:
    """The chart's templates as `helm install` renders them for a cluster of `kube_version`
    (.Capabilities.KubeVersion; Helm's default, the newest it knows, when None). helm-python-sdk's
    Chart.render does not take a version yet; its native call does (helm-python-sdk is pinned)."""
    chart = helm.Chart.load(str(CHART))
    if kube_version is None:
        return chart.render(values, name=name, namespace=namespace, is_install=True)
    options = {"name": name, "namespace": namespace, "is_install": True, "kube_version": kube_version}
    rendered = helm_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
    templates: dict[str, str] = json.loads(rendered)
    return templates


def render_chart(values: dict[str, Any], kube_version: str | None = None) -> list[Manifest]:
    rendered = render_templates(values, kube_version)
    return [doc for path, text in rendered.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def chart_cases() -> Iterator[tuple[str, list[Manifest]]]:
    for label, values in CHART_VALUES.items():
        yield f"chart: {label}", render_chart(values)


def operator_objects(spec: api.StackSpec, stack: str = "demo", namespace: str = "team") -> list[Manifest]:
    """What the operator applies: the workloads and every generated Secret (values are placeholders)."""
    urls = {"database_url": "postgresql://x", "shared_queue_url": "postgresql://y", "shared_queue_analytics_url": "z"}
    secrets = [
        objects.credentials_secret(stack, namespace, "nexus", urls),
        objects.generated_secret(stack, namespace, objects.ui_secret_name(stack), "nexus", {"NEXUS_UI_TOKEN": "t"}),
    ]
    if spec.postgres.managed:
        name = objects.admin_secret_name(stack)
        secrets.append(objects.generated_secret(stack, namespace, name, "postgres", {"POSTGRES_PASSWORD": "p"}))
    built = objects.workloads(stack, namespace, spec) + secrets
    # An image bump's migration Jobs, one per database's service.
    for deployment in (m for m in built if m["kind"] == "Deployment"):
        logical = migration_jobs.logical_of(deployment)
        built.append(migration_jobs.migration_job(stack, namespace, spec, logical, "registry.example/stack:2"))
    if spec.backup is not None:
        claim = backup_objects.backup_claim(stack, namespace, spec.backup)
        built += [claim] if claim else []
        # batch/v1beta1 for 1.20, batch/v1 where it is served
        built += [backup_objects.backup_cron_job(stack, namespace, spec, v) for v in backup_objects.CRON_JOB_VERSIONS]
    if spec.postgres.managed and spec.postgres.managed.restore_from:
        built.append(backup_objects.restore_job(stack, namespace, spec))
    if spec.genesis.sandbox is api.GenesisSandbox.POD:
        built.append(genesis_job_pod(stack, namespace, spec))
    return built


def genesis_job_pod(stack: str, namespace: str, spec: api.StackSpec, language: str = "python") -> Manifest:
    """A job Pod as Genesis creates it from the environment the operator gives it (sandbox: pod)."""
    genesis = next(
        d for d in objects.service_deployments(stack, namespace, spec) if d["metadata"]["name"].endswith("-genesis")
    )
    env = {e["name"]: e.get("value", "") for e in genesis["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = pod_sandbox.PodSandboxSettings(
        job_image=env["GENESIS_JOB_IMAGE"],
        runtime_class=env["GENESIS_RUNTIME_CLASS"],
        job_labels=env["GENESIS_JOB_LABELS"],
        pod_name=f"{stack}-genesis-5d8f7c9b4-x2x7q",
    )
    lang = get_language(language)
    phases = pod_sandbox.job_phases(lang, Limits(), run=True)
    return pod_sandbox.job_pod_manifest(
        name="genesis-job-0123456789ab",
        namespace=namespace,
        image=settings.job_image,
        code="print('hello')\n",
        language=lang,
        phases=phases,
        limits=Limits(),
        nonce="0" * 32,
        uid=pod_sandbox.JOB_UID_RANGE[0],
        labels=settings.labels(),
        runtime_class=settings.runtime_class,
        owner=(settings.pod_name, "8d3c2f4e-0000-4000-8000-000000000000"),
        image_pull_policy=env["GENESIS_JOB_IMAGE_PULL_POLICY"],
    )


def operator_cases() -> Iterator[tuple[str, list[Manifest]]]:
    for label, spec in STACK_SPECS.items():
        yield f"operator: {label}", operator_objects(api.parse_spec(spec))


def all_cases() -> list[tuple[str, list[Manifest]]]:
    return [*chart_cases(), *operator_cases()]


POD_TEMPLATE_PATHS = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def pod_template(manifest: Manifest) -> Manifest | None:
    """The Pod (metadata and spec) a workload object creates; None for objects that create no Pod."""
    path = POD_TEMPLATE_PATHS.get(manifest["kind"])
    if path is None:
        return None
    node: Any = manifest
    for key in path:
        node = node[key]
    return {"metadata": node.get("metadata", {}), "spec": node["spec"]}
