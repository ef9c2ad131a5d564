"""Upgrades gated by the new image's migrations: pure functions, no API calls here.

A service whose Deployment runs another image than the spec asks for gets a Job from the *new* image
running `singularity-stack migrate <service>` as that service's role; its Deployment keeps the old image
until the Job has succeeded. The Job's name carries a hash of the image, so each image is migrated once
(a finished Job is never made again) and a new image after a failed one starts afresh.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from singularity_operator import api, objects
from singularity_stack.provision.migrations import service_kind

Manifest = dict[str, Any]
TERMINATION_LOG = "/dev/termination-log"
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 1500
IMAGE_ANNOTATION = f"{api.GROUP}/image"
BACKOFF_LIMIT = 1  # one retry: a failed migration is rolled back, so trying again is safe
DEADLINE_SECONDS = 900
COMPONENT_SUFFIX = "-migration"  # the Jobs' component label: never the service's own (its Service selects that)


def logical_of(deployment: Manifest) -> str:
    """`singularity-3` (the component label) → `singularity_3`."""
    return str(deployment["metadata"]["labels"]["app.kubernetes.io/component"]).replace("-", "_")


def job_name(stack: str, logical: str, image: str) -> str:
    digest = hashlib.sha256(image.encode()).hexdigest()[:8]
    return f"{objects.object_name(stack, logical)}-migrate-{digest}"


def image_of(deployment: Manifest | None) -> str | None:
    """The image a Deployment's (first) container runs, None for no Deployment."""
    if not deployment:
        return None
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    return str(containers[0]["image"]) if containers else None


def with_image(deployment: Manifest, image: str) -> Manifest:
    """The desired Deployment, but still on `image` (held back until the new image's migrations ran)."""
    held = copy.deepcopy(deployment)
    pod = held["spec"]["template"]["spec"]
    for container in [pod["containers"][0], *pod.get("initContainers", [])]:  # the init container migrates
        container["image"] = image
    return held


def rolled_out(deployment: Manifest | None, image: str) -> bool:
    """Whether the Deployment runs `image` and every replica is updated and available (`kubectl rollout
    status`'s test: the controller has seen this generation)."""
    if not deployment or image_of(deployment) != image:
        return False
    status = deployment.get("status") or {}
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    generation = (deployment.get("metadata") or {}).get("generation")
    return (
        (generation is None or (status.get("observedGeneration") or 0) >= generation)
        and (status.get("updatedReplicas") or 0) >= wanted
        and (status.get("availableReplicas") or 0) >= wanted
        and not status.get("unavailableReplicas")
    )


def migration_job(stack: str, namespace: str, spec: api.StackSpec, logical: str, image: str) -> Manifest:
    """The Job applying `image`'s migrations to `logical`'s database, as its role (the URL in its Secret)."""
    component = objects.component_of(logical) + COMPONENT_SUFFIX
    kind = service_kind(logical)
    container = {
        "name": "migrate",
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": ["migrate", kind, "--termination-log", TERMINATION_LOG],
        "env": [
            {
                "name": "DATABASE_URL",
                "valueFrom": {
                    "secretKeyRef": {"name": objects.credentials_secret_name(stack, logical), "key": "DATABASE_URL"}
                },
            }
        ],
        # The command writes its outcome there; a crash before it could leaves the log's end instead.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    meta_labels = objects.labels(stack, component)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(stack, logical, image),
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {IMAGE_ANNOTATION: image},
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": DEADLINE_SECONDS,
            "template": {
                "metadata": {"labels": meta_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": stack,
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": objects.SERVICE_UID,
                        "runAsGroup": objects.SERVICE_UID,
                        "seccompProfile": dict(objects.RUNTIME_DEFAULT_SECCOMP),  # restricted, as the services
                    },
                    "containers": [container],
                },
            },
        },
    }


@dataclass(frozen=True)
class JobState:
    """What a migration Job came to: running (neither flag), succeeded, or failed with the Job's reason."""

    succeeded: bool = False
    failed: bool = False
    reason: str = ""
    message: str = ""


def job_state(job: Manifest) -> JobState:
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobState(succeeded=True)
        if condition.get("type") == "Failed":
            return JobState(
                failed=True, reason=condition.get("reason") or "Failed", message=condition.get("message") or ""
            )
    return JobState()


def terminated_message(pod: Manifest) -> str:
    """The migrate container's termination message (what the command wrote, or its log's end)."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated:
            return f"exit code {terminated.get('exitCode')}: {(terminated.get('message') or '').strip()}".strip()
    return ""


def tail(text: str, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    kept = "\n".join(text.strip().splitlines()[-lines:])
    return kept if len(kept) <= chars else "…" + kept[-chars:]


def failure_message(logical: str, image: str, name: str, state: JobState, termination: str, log: str) -> str:
    """One condition message: whose migration, from which image, the Job's reason, the container's
    termination and the log's last lines (the same text every reconcile, so it is reported once)."""
    why = f"{state.reason}: {state.message}" if state.message else state.reason
    parts = [f"{logical}: migration Job {name} from image {image} failed ({why})"]
    if termination:
        parts.append(termination)
    parts.append(f"log tail: {tail(log)}" if log.strip() else "no log available")
    return "; ".join(parts)
