"""Every Pod the chart renders and the operator builds, checked against the Pod Security Standards.

The controls are the published ones (kubernetes.io, "Pod Security Standards", the Baseline and Restricted
tables), written out below under their names there: each is the fields it restricts and the values it
allows. Every Pod passes Restricted except Genesis with spec.genesis.seccompProfile.type Unconfined (the
default: bubblewrap needs user namespaces), which fails Baseline on Seccomp alone; with the chart's
Localhost profile Genesis passes Restricted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from singularity_operator import api
from singularity_stack_testing import manifests

Pod = dict[str, Any]  # {"metadata": ..., "spec": ...}

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUME_SOURCES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def containers(pod: Pod) -> Iterator[dict[str, Any]]:
    for field in ("containers", "initContainers", "ephemeralContainers"):
        yield from pod["spec"].get(field) or []


def pod_sc(pod: Pod) -> dict[str, Any]:
    return pod["spec"].get("securityContext") or {}


def sc(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("securityContext") or {}


def contexts(pod: Pod) -> Iterator[tuple[str, dict[str, Any]]]:
    """The Pod's security context and each container's, named as the controls' 'Restricted Fields' are."""
    yield "spec.securityContext", pod_sc(pod)
    for container in containers(pod):
        yield f"container {container['name']}", sc(container)


# -- Baseline ---------------------------------------------------------------------------------------


def host_process(pod: Pod) -> list[str]:
    return [
        f"{where}.windowsOptions.hostProcess"
        for where, c in contexts(pod)
        if (c.get("windowsOptions") or {}).get("hostProcess")
    ]


def host_namespaces(pod: Pod) -> list[str]:
    return [f"spec.{field}" for field in ("hostNetwork", "hostPID", "hostIPC") if pod["spec"].get(field)]


def privileged_containers(pod: Pod) -> list[str]:
    return [f"container {c['name']} privileged" for c in containers(pod) if sc(c).get("privileged")]


def baseline_capabilities(pod: Pod) -> list[str]:
    return [
        f"container {c['name']} adds {cap}"
        for c in containers(pod)
        for cap in (sc(c).get("capabilities") or {}).get("add") or []
        if cap not in BASELINE_CAPABILITIES
    ]


def host_path_volumes(pod: Pod) -> list[str]:
    return [f"volume {v['name']} hostPath" for v in pod["spec"].get("volumes") or [] if "hostPath" in v]


def host_ports(pod: Pod) -> list[str]:
    return [
        f"container {c['name']} hostPort {p['hostPort']}"
        for c in containers(pod)
        for p in c.get("ports") or []
        if p.get("hostPort")
    ]


def apparmor(pod: Pod) -> list[str]:
    prefix = "container.apparmor.security.beta.kubernetes.io/"
    found = [
        f"annotation {key}={value}"
        for key, value in (pod["metadata"].get("annotations") or {}).items()
        if key.startswith(prefix) and value != "runtime/default" and not value.startswith("localhost/")
    ]
    return found + [
        f"{where}.appArmorProfile.type={c['appArmorProfile'].get('type')}"
        for where, c in contexts(pod)
        if "appArmorProfile" in c and c["appArmorProfile"].get("type") not in ("RuntimeDefault", "Localhost")
    ]


def selinux(pod: Pod) -> list[str]:
    found = []
    for where, c in contexts(pod):
        options = c.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            found.append(f"{where}.seLinuxOptions.type={options['type']}")
        found += [f"{where}.seLinuxOptions.{key}" for key in ("user", "role") if options.get(key)]
    return found


def proc_mount(pod: Pod) -> list[str]:
    return [
        f"container {c['name']} procMount={sc(c)['procMount']}"
        for c in containers(pod)
        if sc(c).get("procMount", "Default") != "Default"
    ]


def seccomp_baseline(pod: Pod) -> list[str]:
    return [
        f"{where}.seccompProfile.type=Unconfined"
        for where, c in contexts(pod)
        if (c.get("seccompProfile") or {}).get("type") == "Unconfined"
    ]


def sysctls(pod: Pod) -> list[str]:
    return [f"sysctl {s['name']}" for s in pod_sc(pod).get("sysctls") or [] if s["name"] not in SAFE_SYSCTLS]


# -- Restricted -------------------------------------------------------------------------------------


def volume_types(pod: Pod) -> list[str]:
    return [
        f"volume {v['name']}: {source}"
        for v in pod["spec"].get("volumes") or []
        for source in set(v) - {"name"}
        if source not in RESTRICTED_VOLUME_SOURCES
    ]


def privilege_escalation(pod: Pod) -> list[str]:
    return [
        f"container {c['name']} allowPrivilegeEscalation is not false"
        for c in containers(pod)
        if sc(c).get("allowPrivilegeEscalation") is not False
    ]


def running_as_non_root(pod: Pod) -> list[str]:
    pod_level = pod_sc(pod).get("runAsNonRoot")
    found = ["spec.securityContext.runAsNonRoot=false"] if pod_level is False else []
    for c in containers(pod):
        own = sc(c).get("runAsNonRoot")
        if own is False or (own is None and pod_level is not True):
            found.append(f"container {c['name']} runAsNonRoot not true")
    return found


def running_as_non_root_user(pod: Pod) -> list[str]:
    return [f"{where}.runAsUser=0" for where, c in contexts(pod) if c.get("runAsUser") == 0]


def seccomp_restricted(pod: Pod) -> list[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod_type = (pod_sc(pod).get("seccompProfile") or {}).get("type")
    found = [] if pod_type in (None, *allowed) else [f"spec.securityContext.seccompProfile.type={pod_type}"]
    for c in containers(pod):
        own = (sc(c).get("seccompProfile") or {}).get("type")
        effective = own or pod_type
        if effective not in allowed:
            found.append(f"container {c['name']} seccompProfile.type={effective}")
    return found


def restricted_capabilities(pod: Pod) -> list[str]:
    found = []
    for c in containers(pod):
        capabilities = sc(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"container {c['name']} does not drop ALL")
        found += [
            f"container {c['name']} adds {cap}" for cap in capabilities.get("add") or [] if cap != "NET_BIND_SERVICE"
        ]
    return found


@dataclass(frozen=True)
class Control:
    level: str  # the profile whose table lists it
    name: str  # as the table names it
    check: Callable[[Pod], list[str]]


CONTROLS = [
    Control("baseline", "HostProcess", host_process),
    Control("baseline", "Host Namespaces", host_namespaces),
    Control("baseline", "Privileged Containers", privileged_containers),
    Control("baseline", "Capabilities", baseline_capabilities),
    Control("baseline", "HostPath Volumes", host_path_volumes),
    Control("baseline", "Host Ports", host_ports),
    Control("baseline", "AppArmor", apparmor),
    Control("baseline", "SELinux", selinux),
    Control("baseline", "/proc Mount Type", proc_mount),
    Control("baseline", "Seccomp", seccomp_baseline),
    Control("baseline", "Sysctls", sysctls),
    Control("restricted", "Volume Types", volume_types),
    Control("restricted", "Privilege Escalation (v1.8+)", privilege_escalation),
    Control("restricted", "Running as Non-root", running_as_non_root),
    Control("restricted", "Running as Non-root user (v1.23+)", running_as_non_root_user),
    Control("restricted", "Seccomp (v1.19+)", seccomp_restricted),
    Control("restricted", "Capabilities (v1.22+)", restricted_capabilities),
]


def violations(pod: Pod) -> dict[str, list[str]]:
    """'<level>: <control>' → what breaks it; empty when the Pod passes Restricted (and so Baseline)."""
    found = {f"{control.level}: {control.name}": control.check(pod) for control in CONTROLS}
    return {key: value for key, value in found.items() if value}


def pods() -> list[tuple[str, Pod]]:
    found = []
    for case, objects in manifests.all_cases():
        for manifest in objects:
            if (pod := manifests.pod_template(manifest)) is not None:
                found.append((f"{case} / {manifest['kind']} {manifest['metadata']['name']}", pod))
    return found


PODS = pods()
# The one documented exception, and the option that asks for it.
UNCONFINED = "spec.genesis.seccompProfile.type=Unconfined (the default): bubblewrap needs user namespaces"


def documented_exception(pod: Pod) -> str | None:
    genesis = pod["metadata"]["labels"].get("app.kubernetes.io/component") == "genesis"
    profile = sc(pod["spec"]["containers"][0]).get("seccompProfile")
    return UNCONFINED if genesis and profile == {"type": "Unconfined"} else None


def test_every_pod_kind_is_covered():
    """The chart's operator, every stack service, managed PostgreSQL, the migration, backup and restore Jobs."""
    names = {re.sub(r"-[0-9a-f]{8}$", "-<image>", label.split(" / ", 1)[1]) for label, _ in PODS}
    services = ["centralcloud", "nexus", "genesis", *(f"singularity-{i}" for i in (1, 2, 3))]
    assert names == {
        "Deployment ops-singularity-stack",
        *(f"Deployment demo-{service}" for service in services),
        *(f"Job demo-{service}-migrate-<image>" for service in services),
        "StatefulSet demo-postgres",
        "CronJob demo-backup",
        "Job demo-restore",
        "Pod genesis-job-0123456789ab",  # a job Pod of spec.genesis.sandbox pod, as Genesis builds it
    }
    # the chart's operator once per values; each spec's four services and their migrations
    cases = {label.split(" / ", 1)[0] for label, _ in PODS}
    assert len(cases) == len(manifests.CHART_VALUES) + len(manifests.STACK_SPECS)


@pytest.mark.parametrize(("label", "pod"), PODS, ids=[label for label, _ in PODS])
def test_pod_meets_restricted_or_its_documented_exception(label: str, pod: Pod):
    if documented_exception(pod):
        # Baseline fails on Seccomp alone, nothing else.
        assert violations(pod) == {
            "baseline: Seccomp": ["container genesis.seccompProfile.type=Unconfined"],
            "restricted: Seccomp (v1.19+)": ["container genesis seccompProfile.type=Unconfined"],
        }, UNCONFINED
    else:
        assert violations(pod) == {}, label


def test_the_exception_is_genesis_unconfined_by_default_only():
    excepted = [label for label, pod in PODS if documented_exception(pod)]
    assert excepted == [
        "operator: defaults (spec.genesis.seccompProfile.type=Unconfined) / Deployment demo-genesis",
        "operator: spec.postgres.managed with storageClassName and resources / Deployment demo-genesis",
    ]  # the migration Jobs run no sandbox: RuntimeDefault, whatever Genesis's profile


def test_genesis_and_its_job_pods_with_sandbox_pod_meet_restricted():
    """spec.genesis.sandbox pod: Genesis needs no user namespaces (RuntimeDefault), its job Pods pass too."""
    labels = [label for label, _ in PODS if label.startswith("operator: spec.genesis.sandbox=pod")]
    assert any(label.endswith("Deployment demo-genesis") for label in labels)
    assert any(label.endswith("Pod genesis-job-0123456789ab") for label in labels)
    for label, pod in PODS:
        if label in labels:
            assert violations(pod) == {}, label
            assert pod_sc(pod)["seccompProfile"] == {"type": "RuntimeDefault"}, label
            assert all("seccompProfile" not in sc(c) for c in containers(pod)), label


def test_genesis_with_the_localhost_profile_meets_restricted():
    localhost = [pod for label, pod in PODS if label.endswith("Localhost / Deployment demo-genesis")]
    assert len(localhost) == 1
    [container] = localhost[0]["spec"]["containers"]
    assert container["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": manifests.LOCALHOST_PROFILE,
    }
    assert violations(localhost[0]) == {}


# Each control shown to catch what it forbids: a compliant Pod, then one field made to break it.
def good_pod() -> Pod:
    return {
        "metadata": {},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "app",
                    "ports": [{"containerPort": 80}],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def container_sc(**fields: Any) -> Callable[[Pod], None]:
    def apply(pod: Pod) -> None:
        pod["spec"]["containers"][0]["securityContext"].update(fields)

    return apply


def pod_field(**fields: Any) -> Callable[[Pod], None]:
    return lambda pod: pod["spec"].update(fields)


def pod_security(**fields: Any) -> Callable[[Pod], None]:
    return lambda pod: pod["spec"]["securityContext"].update(fields)


BREAKS: dict[str, Callable[[Pod], None]] = {
    "baseline: HostProcess": pod_security(windowsOptions={"hostProcess": True}),
    "baseline: Host Namespaces": pod_field(hostPID=True),
    "baseline: Privileged Containers": container_sc(privileged=True),
    "baseline: Capabilities": container_sc(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "baseline: HostPath Volumes": pod_field(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
    "baseline: Host Ports": lambda pod: pod["spec"]["containers"][0]["ports"][0].update(hostPort=80),
    "baseline: AppArmor": lambda pod: pod["metadata"].update(
        annotations={"container.apparmor.security.beta.kubernetes.io/app": "unconfined"}
    ),
    "baseline: SELinux": pod_security(seLinuxOptions={"type": "spc_t"}),
    "baseline: /proc Mount Type": container_sc(procMount="Unmasked"),
    "baseline: Seccomp": pod_security(seccompProfile={"type": "Unconfined"}),
    "baseline: Sysctls": pod_security(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "restricted: Volume Types": pod_field(volumes=[{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
    "restricted: Privilege Escalation (v1.8+)": lambda pod: pod["spec"]["containers"][0]["securityContext"].pop(
        "allowPrivilegeEscalation"
    ),
    "restricted: Running as Non-root": pod_security(runAsNonRoot=False),
    "restricted: Running as Non-root user (v1.23+)": container_sc(runAsUser=0),
    "restricted: Seccomp (v1.19+)": lambda pod: pod["spec"]["securityContext"].pop("seccompProfile"),
    "restricted: Capabilities (v1.22+)": container_sc(capabilities={"drop": ["ALL"], "add": ["CHOWN"]}),
}


def test_every_control_is_exercised():
    assert set(BREAKS) == {f"{c.level}: {c.name}" for c in CONTROLS}


@pytest.mark.parametrize("control", sorted(BREAKS))
def test_each_control_refuses_what_it_forbids(control: str):
    assert violations(good_pod()) == {}
    pod = good_pod()
    BREAKS[control](pod)
    found = violations(pod)
    assert control in found, found
    if control.startswith("baseline"):
        # Restricted includes Baseline: only its own stricter twins may fire with it (Seccomp, Capabilities, volumes).
        assert {key for key in found if key.startswith("baseline")} == {control}, found
    else:
        assert set(found) == {control}, found


@pytest.mark.parametrize(
    "profile",
    [
        {"type": "Localhost"},  # which profile?
        {"type": "Unconfined", "localhostProfile": "x.json"},
        {"type": "Localhost", "localhostProfile": "/var/lib/kubelet/seccomp/x.json"},  # relative to that directory
        {"type": "Localhost", "localhostProfile": "../x.json"},
        {"type": "RuntimeDefault"},  # bubblewrap cannot run under it
    ],
)
def test_a_genesis_seccomp_profile_that_cannot_work_is_refused(profile: dict[str, str]):
    with pytest.raises(ValidationError, match="seccompProfile"):
        api.parse_spec({"genesis": {"seccompProfile": profile}})
