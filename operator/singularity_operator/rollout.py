"""Image changes, gated by the new image's migrations: which image each Deployment may run now.

A service whose Deployment runs another image than its spec asks for keeps that image until the migration
Job from the new one (migration_jobs.py) has succeeded; a failed Job keeps it there, saying why. Singularity
instances take turns: instance i+1 starts its migration only once instance i runs the new image, every
replica available, so the others keep serving meanwhile. The manifests are built by pure functions; this
module only reads Jobs and Pods and creates a Job when one is due.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from singularity_operator import api, objects
from singularity_operator import conditions as cond
from singularity_operator import migration_jobs as mj
from singularity_operator.kube import Kube

Adopt = Callable[[dict[str, Any]], None]
EventRecorder = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)
SHOWN = 5  # databases named in a condition message (200 instances' names would not make one readable)


@dataclass
class Plan:
    deployments: list[dict[str, Any]]
    images: dict[str, str]  # logical owner → the image its Deployment runs after this pass
    wanted: dict[str, str] = field(default_factory=dict)  # logical owner → the image its spec asks for
    failures: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def verdict(self, migrations: dict[str, list[str]], awaiting: Collection[str] = ()) -> cond.Verdict:
        """From the Jobs of this pass and what each database records. `awaiting`: the databases that record
        nothing and whose pods are not available yet: new, their pods' init container not done (the operator
        never migrates a database itself; once a pod is available, its init container has applied its image's)."""
        if self.failures:
            return cond.Verdict(cond.MIGRATIONS, False, "MigrationFailed", "; ".join(self.failures))
        if self.pending:
            return cond.Verdict(cond.MIGRATIONS, None, "Migrating", "; ".join(self.pending))
        empty = sorted(awaiting)
        if empty:
            named = ", ".join(empty[:SHOWN]) + (f" and {len(empty) - SHOWN} more" if len(empty) > SHOWN else "")
            waiting = f"{named}: no migration recorded yet (each pod's init container applies its image's)"
            return cond.Verdict(cond.MIGRATIONS, None, "AwaitingInitContainers", waiting)
        applied = ", ".join(f"{db}: {v[-1]}" for db, v in sorted(migrations.items()) if v)
        # never an empty message: the CRD's condition message is a required string
        return cond.Verdict(cond.MIGRATIONS, True, "Applied", applied or "no migration recorded by any database")


class Rollout:
    def __init__(self, kube: Kube, *, adopt: Adopt, event: EventRecorder) -> None:
        self.kube = kube
        self.adopt = adopt
        self.event = event

    def plan(self, stack: str, namespace: str, spec: api.StackSpec, live: dict[str, dict[str, Any] | None]) -> Plan:
        plan = Plan([], {})
        previous_rolled = True  # Singularity instances: has every instance before this one rolled out?
        for desired in objects.service_deployments(stack, namespace, spec):
            logical = mj.logical_of(desired)
            wanted = str(mj.image_of(desired))
            plan.wanted[logical] = wanted
            current = mj.image_of(live.get(logical))
            instance = logical.startswith("singularity_")
            if current is None or current == wanted:
                plan.deployments.append(desired)
                plan.images[logical] = wanted
                if instance and current is not None and not mj.rolled_out(live.get(logical), wanted):
                    previous_rolled = False
                continue
            held = mj.with_image(desired, current)
            if instance and not previous_rolled:
                plan.deployments.append(held)
                plan.images[logical] = current
                plan.pending.append(f"{logical}: waits for the instance before it to roll out {wanted}")
                continue
            name, state = self._job(stack, namespace, spec, logical, wanted)
            if state.succeeded:
                plan.deployments.append(desired)
                plan.images[logical] = wanted
            else:
                plan.deployments.append(held)
                plan.images[logical] = current
                if state.failed:
                    plan.failures.append(self._failure(namespace, logical, wanted, name, state))
                else:
                    plan.pending.append(f"{logical}: migration Job {name} from image {wanted} running")
            if instance:  # it has not rolled out yet (its Deployment changes only now, if at all)
                previous_rolled = False
        if plan.failures:
            # once per failure: the handler posts a Warning only when the stack does not already show it
            self.event("Warning", "MigrationFailed", "; ".join(plan.failures))
        self._prune(stack, namespace, plan, live)
        return plan

    def _prune(self, stack: str, namespace: str, plan: Plan, live: dict[str, dict[str, Any] | None]) -> None:
        """Finished migration Jobs of images a service no longer runs go (with their Pods); the Job of the image
        it runs stays, for `kubectl logs`. Only once a service runs the image its spec asks for: a failed Job
        stays while it is what the stack reports (and deleting it would only make it run again)."""
        selector = f"app.kubernetes.io/instance={stack},app.kubernetes.io/managed-by=singularity-operator"
        settled = {logical for logical, image in plan.wanted.items() if mj.image_of(live.get(logical)) == image}
        for job in self.kube.list("batch/v1", "Job", namespace, selector):
            image = (job["metadata"].get("annotations") or {}).get(mj.IMAGE_ANNOTATION)
            component = job["metadata"]["labels"].get("app.kubernetes.io/component", "")
            if image is None or not component.endswith(mj.COMPONENT_SUFFIX):
                continue  # not a migration Job (a backup's, say)
            logical = component.removesuffix(mj.COMPONENT_SUFFIX).replace("-", "_")
            state = mj.job_state(job)
            if logical in settled and image != plan.wanted[logical] and (state.succeeded or state.failed):
                name = job["metadata"]["name"]
                self.kube.client.resources.get(api_version="batch/v1", kind="Job").delete(
                    name=name, namespace=namespace, body={"propagationPolicy": "Background"}
                )
                self.event("Normal", "Deleted", f"deleted Job {name}: {logical} runs {plan.wanted[logical]}")

    def _job(
        self, stack: str, namespace: str, spec: api.StackSpec, logical: str, image: str
    ) -> tuple[str, mj.JobState]:
        """The migration Job of `image` for `logical`, created when there is none (never again once finished)."""
        name = mj.job_name(stack, logical, image)
        job = self.kube.get("batch/v1", "Job", name, namespace)
        if job is None:
            job = mj.migration_job(stack, namespace, spec, logical, image)
            self.adopt(job)
            if self.kube.apply(job, create_only=True) == "created":
                self.event("Normal", "MigrationStarted", f"{logical}: migrating to image {image} (Job {name})")
        return name, mj.job_state(job)

    def _failure(self, namespace: str, logical: str, image: str, name: str, state: mj.JobState) -> str:
        pods = self.kube.list("v1", "Pod", namespace, f"job-name={name}")
        pods.sort(key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
        if not pods:
            return mj.failure_message(logical, image, name, state, "", "")
        pod = pods[-1]
        return mj.failure_message(
            logical, image, name, state, mj.terminated_message(pod), self._log(pod["metadata"]["name"], namespace)
        )

    def _log(self, pod: str, namespace: str) -> str:
        """The migrate container's last lines (pods/log, served by the node's kubelet); empty when the
        node cannot give them (gone, or none ran it): the termination message still says why."""
        core = CoreV1Api(self.kube.client.client)
        try:
            return str(core.read_namespaced_pod_log(pod, namespace, container="migrate", tail_lines=mj.LOG_TAIL_LINES))
        except ApiException:
            return ""
