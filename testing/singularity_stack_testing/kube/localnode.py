"""A complete single-node Kubernetes 1.20 on this machine, from Debian packages and Debian's source alone.

The e2e suite's second cluster provider (kind is the first): real Pods run the project's images, with no
Docker and no registry. One instance per machine at a time (it owns a fixed node IP and kubelet's cgroups).

    with LocalNode().start() as node:
        node.load_image(Path("singularity-stack_0.1.0.tar"))
        ...  # kubectl --kubeconfig node.kubeconfig ...

- Control plane: etcd, kube-apiserver (bound to the node IP, so Pods reach it through the `kubernetes`
  Service), kube-controller-manager, kube-scheduler (kube/apiserver.py).
- Node: containerd 1.6 + runc with the cgroupfs driver, kubelet with its own serving and client certificates
  (webhook authentication and authorization), kube-proxy in iptables mode; the CNI bridge plugin with
  host-local IPAM; dnsmasq for cluster DNS; local PersistentVolumes behind a default StorageClass
  (kube/clustersync.py). The pause image is compiled from the Kubernetes source and imported.
- kubelet reads Localhost seccomp profiles from its run directory, where the chart's Genesis profile is.
- Addresses stay on this machine: the node IP on a dummy interface (a documentation range), Pods in
  198.18.0.0/16 and Services in 198.19.0.0/16 (reserved for testing).
- stop() leaves nothing behind: processes, mounts, network namespaces, veths and the bridge, iptables
  chains, cgroups, sysctls, the run directory (kube/hostnet.py; leftovers() checks).

It needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN; :func:`unavailable_reason` says why it cannot run here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from ..seccomp_profile import PROFILE_FILE
from . import containerd, hostnet, hoststate
from .apiserver import (
    BUILD_SCRIPT,
    PROXY_USER,
    SCHEDULER_USER,
    SERVICE_CLUSTER_IP_RANGE,
    Binaries,
    BinariesMissing,
    ControlPlane,
    cache_dir,
    find_binaries,
    free_ports,
)
from .clustersync import CLUSTER_DOMAIN, ClusterSync
from .processes import ProcessGroup

NODE_NAME = "singularity-e2e-node"
RUN_DIR_PREFIX = "singularity-node-"
NODE_IP = "203.0.113.10"
NODE_LINK = "sse2e-node0"
BRIDGE = "sse2e-br0"
POD_CIDR = "198.18.0.0/16"
POD_GATEWAY = "198.18.0.1"
# Files outside the run directory that kubelet and containerd write wherever they are told to run.
SHARED_DIRS = (Path("/var/log/pods"), Path("/var/log/containers"), Path("/run/containerd/s"))
NODE_READY_TIMEOUT = 120.0
# Genesis's Localhost profile (the chart's file) as a stack names it, below the kubelet's seccomp directory.
SECCOMP_PROFILE = f"singularity-stack/{PROFILE_FILE.name}"
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
RUNTIME_TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "dnsmasq": "dnsmasq-base",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "ebtables": "ebtables",
    "socat": "socat",
    "ip": "iproute2",
}


log = logging.getLogger(__name__)


class LocalNodeError(RuntimeError):
    """The local node failed to start or to stop cleanly; the message says where to look."""


@dataclass(frozen=True)
class NodeBinaries:
    control_plane: Binaries
    kube_scheduler: Path
    kubelet: Path
    kube_proxy: Path
    pause: Path
    kubectl: Path


def find_node_binaries() -> NodeBinaries:
    """The cached Kubernetes binaries, the pause binary, and the runtime's Debian packages; else BinariesMissing."""
    bin_dir = cache_dir() / "bin"
    binaries = NodeBinaries(
        control_plane=find_binaries(),
        kube_scheduler=bin_dir / "kube-scheduler",
        kubelet=bin_dir / "kubelet",
        kube_proxy=bin_dir / "kube-proxy",
        pause=bin_dir / "pause",
        kubectl=bin_dir / "kubectl",
    )
    missing = [str(path) for path in vars(binaries).values() if isinstance(path, Path) and not os.access(path, os.X_OK)]
    if missing:
        raise BinariesMissing(f"missing {', '.join(missing)}; run {BUILD_SCRIPT} once on this machine")
    packages = sorted({package for tool, package in RUNTIME_TOOLS.items() if shutil.which(tool) is None})
    if not Path(containerd.CNI_BIN_DIR, "bridge").exists():
        packages.append("containernetworking-plugins")
    if packages:
        raise BinariesMissing(f"missing Debian packages: {' '.join(packages)} (apt-get install them)")
    return binaries


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def unavailable_reason() -> str | None:
    """Why a local node cannot run on this machine (privileges, binaries, a node already running), or None."""
    if os.geteuid() != 0:
        return "the local node needs root (it runs kubelet, containerd and changes the host's network)"
    caps = _capabilities()
    for name, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_NET_ADMIN", CAP_NET_ADMIN)):
        if not caps & (1 << bit):
            return f"the local node needs {name}, which this process does not have"
    if not (hoststate.CGROUP_ROOT / "memory").is_dir():
        return f"the local node needs cgroup v1 hierarchies under {hoststate.CGROUP_ROOT} (kubelet runs with cgroupfs)"
    try:
        find_node_binaries()
    except BinariesMissing as exc:
        return str(exc)
    running = running_kubelets()
    if running:
        return f"another local node is running on this machine (kubelet pid {running[0]})"
    return None


def run_parent() -> Path:
    # Not under /tmp: containerd's overlay snapshots and kubelet's volumes need a real filesystem.
    return Path(os.environ.get("SINGULARITY_NODE_RUN_DIR", "/var/tmp"))


def running_kubelets() -> list[int]:
    """Kubelets of local nodes (ours run with --root-dir under a run directory)."""
    marker = str(run_parent() / RUN_DIR_PREFIX)
    return [pid for pid in hoststate.processes_mentioning(marker) if hoststate.argv0(pid).endswith("/kubelet")]


def reclaim_leftovers() -> list[str]:
    """Remove what a local node killed outright (its test process SIGKILLed) left behind: its processes, the
    Pods' processes and cgroups, mounts, interfaces, iptables chains and run directories. Not to be called
    while a node runs. (Sysctls it changed cannot be restored: their old values died with it.)"""
    removed = []
    workdirs = sorted(run_parent().glob(RUN_DIR_PREFIX + "*"))
    for workdir in workdirs:
        for pid in hoststate.processes_mentioning(str(workdir)):
            name = Path(hoststate.argv0(pid)).name or "?"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
                removed.append(f"process {pid} ({name})")
    if hoststate.cgroup_dirs():
        hoststate.kill_cgroup_processes()
        hoststate.remove_cgroups()
        removed.append("kubepods cgroups")
    for workdir in workdirs:
        hoststate.unmount_all(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append(f"run directory {workdir}")
    for link in (BRIDGE, NODE_LINK):
        if hostnet.link_exists(link):
            hostnet.delete_link(link)
            removed.append(f"interface {link}")
    with contextlib.suppress(hostnet.HostNetworkError):
        removed += [f"iptables chains in {table}" for table in hostnet.remove_owned_chains()]
    return removed


class LocalNode:
    """A one-node cluster on this machine; start() brings it up (about 15 s), stop() removes every trace."""

    def __init__(self, binaries: NodeBinaries | None = None, *, keep_workdir: bool = False) -> None:
        self.binaries = binaries or find_node_binaries()
        self.keep_workdir = keep_workdir
        self.workdir: Path | None = None
        self.control_plane: ControlPlane | None = None
        self.api: ApiClient | None = None
        self.timings: dict[str, float] = {}
        self._group: ProcessGroup | None = None
        self._sync: ClusterSync | None = None
        self._saved_sysctls: dict[str, str] = {}
        self._shared_before: dict[Path, set[str]] = {}

    # --- public API -------------------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self._control_plane().kubeconfig

    @property
    def ctr(self) -> containerd.Ctr:
        return containerd.Ctr(self._path("containerd/containerd.sock"))

    def start(self) -> Self:
        reason = unavailable_reason()
        if reason:
            raise LocalNodeError(reason)
        leftovers = reclaim_leftovers()
        if leftovers:
            log.warning("removed what an earlier local node left behind: %s", ", ".join(leftovers))
        atexit.register(self.stop)
        started = time.monotonic()
        try:
            self._prepare_host()
            self._start_control_plane()
            self._start_containerd()
            self._start_cluster_services()
            self._start_kubelet()
            self._start_kube_proxy()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        return self

    def load_image(self, archive: Path) -> set[str]:
        """Import a docker-archive (scripts/build-images.sh writes them) into the node's containerd."""
        started = time.monotonic()
        added = self.ctr.import_archive(archive)
        self.timings[f"import {archive.name}"] = time.monotonic() - started
        return added

    def stop(self) -> None:
        """Tear everything down, in the order that lets each step succeed. Idempotent."""
        atexit.unregister(self.stop)
        started = time.monotonic()
        if self._sync is not None:
            self._sync.stop()
            self._sync = None
        if self.api is not None:
            self.api.close()
            self.api = None
        if self._group is not None:
            # kubelet first, so it restarts nothing; then the Pods' processes, containerd and its shims.
            self._group.terminate("kubelet")
            hoststate.kill_cgroup_processes()
            self._group.stop()
            containerd.kill_shims(self._path("containerd/containerd.sock"))
            self._group = None
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None
        hoststate.remove_cgroups()
        if self.workdir is not None:
            hoststate.unmount_all(self.workdir)
        hostnet.delete_link(BRIDGE)
        hostnet.delete_link(NODE_LINK)
        with contextlib.suppress(hostnet.HostNetworkError):
            hostnet.remove_owned_chains()
        hostnet.restore_sysctls(self._saved_sysctls)
        for directory, before in self._shared_before.items():
            for name in hoststate.listing(directory) - before:
                path = directory / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self._shared_before = {}
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.workdir is not None:
            self.timings["stop"] = time.monotonic() - started

    def leftovers(self) -> list[str]:
        """What stop() should have removed and did not (empty after a clean teardown)."""
        found = []
        if self.workdir is not None:
            if self.workdir.exists() and not self.keep_workdir:
                found.append(f"run directory {self.workdir}")
            found += [f"mount {point}" for point in hoststate.mounts_under(self.workdir)]
            found += [f"process {pid}" for pid in hoststate.processes_mentioning(str(self.workdir))]
        found += [f"interface {name}" for name in (NODE_LINK, BRIDGE) if hostnet.link_exists(name)]
        found += [f"cgroup {path}" for path in hoststate.cgroup_dirs()]
        found += [f"iptables chain {chain}" for chain in hostnet.owned_chains()]
        current = hostnet.read_sysctls(self._saved_sysctls)
        found += [
            f"sysctl {name}={current.get(name)} (was {value})"
            for name, value in self._saved_sysctls.items()
            if current.get(name) != value
        ]
        return found

    def diagnostics(self) -> str:
        """The tail of every component's log."""
        parts = []
        if self._group is not None:
            parts += [f"--- {name}:\n{self._group.log_tail(name)}" for name in self._group.processes]
        if self.control_plane is not None and self.control_plane.workdir is not None:
            parts += [
                f"--- {name}:\n{self.control_plane.log_tail(name)}"
                for name in ("kube-apiserver", "kube-controller-manager")
            ]
        return "\n".join(parts)

    def memory_rss(self) -> dict[str, int]:
        """Resident memory in bytes of each component, and of all Pods together ("pods", from their cgroup)."""
        usage = self.control_plane.memory_rss() if self.control_plane else {}
        usage.update(self._group.memory_rss() if self._group else {})
        with contextlib.suppress(OSError, ValueError):
            stat = (hoststate.CGROUP_ROOT / "memory" / hoststate.KUBEPODS_CGROUP / "memory.stat").read_text()
            for line in stat.splitlines():
                if line.startswith("total_rss "):
                    usage["pods"] = int(line.split()[1])
        return usage

    def __enter__(self) -> Self:
        if self._group is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- start-up steps ---------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self.workdir is None:
            raise LocalNodeError("local node not started")
        return self.workdir / name

    def _control_plane(self) -> ControlPlane:
        if self.control_plane is None:
            raise LocalNodeError("local node not started")
        return self.control_plane

    @property
    def _bridge_netfilter(self) -> bool:
        """Whether the kernel passes bridged traffic through iptables (the br_netfilter module is loaded)."""
        return "net.bridge.bridge-nf-call-iptables" in self._saved_sysctls

    def _timed(self, step: str, started: float) -> None:
        self.timings[step] = time.monotonic() - started

    def _prepare_host(self) -> None:
        started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=run_parent()))
        self.workdir.chmod(0o755)
        for name in ("logs", "containerd", "cni/net.d", "cni/ipam", "kubelet", "volumes"):
            self._path(name).mkdir(parents=True, exist_ok=True)
        self._install_seccomp_profiles()
        self._group = ProcessGroup(self._path("logs"), LocalNodeError)
        self._shared_before = {directory: hoststate.listing(directory) for directory in SHARED_DIRS}
        self._saved_sysctls = hostnet.read_sysctls(hostnet.TOUCHED_SYSCTLS)
        hostnet.write_sysctl("net.ipv4.ip_forward", "1")
        if self._bridge_netfilter:
            # Service traffic between two Pods on the bridge must pass through kube-proxy's rules.
            hostnet.write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
        hostnet.add_node_interface(NODE_LINK, NODE_IP, [SERVICE_CLUSTER_IP_RANGE])
        self._timed("host network", started)

    def _install_seccomp_profiles(self) -> None:
        """The chart's profile where this kubelet reads Localhost profiles (as the README installs it on a node)."""
        target = self._path("kubelet/seccomp") / SECCOMP_PROFILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROFILE_FILE, target)
        target.chmod(0o644)

    def _start_control_plane(self) -> None:
        started = time.monotonic()
        self.control_plane = ControlPlane(
            self.binaries.control_plane,
            workdir_parent=self.workdir,
            address=NODE_IP,
            service_account_tokens=True,
        ).start(with_controller_manager=True)
        self.api = new_client_from_config(config_file=str(self.kubeconfig))
        self._timed("control plane", started)

    def _start_containerd(self) -> None:
        started = time.monotonic()
        run_dir = self._path("containerd")
        config = run_dir / "config.toml"
        config.write_text(containerd.containerd_config(run_dir, containerd.PAUSE_REFERENCE, self._path("cni/net.d")))
        cni = containerd.cni_config(BRIDGE, POD_CIDR, POD_GATEWAY, self._path("cni/ipam"))
        self._path("cni/net.d/10-singularity-e2e.conflist").write_text(json.dumps(cni, indent=2))
        group = self._started()
        group.launch("containerd", ["containerd", "--config", str(config), "--log-level", "warn"])
        group.wait_until("containerd's socket", self.ctr.answers, 30)
        archive = containerd.pause_image_archive(
            self.binaries.pause, containerd.PAUSE_REFERENCE, self._path("pause.tar")
        )
        self.ctr.import_archive(archive)
        self._timed("containerd", started)

    def _start_cluster_services(self) -> None:
        """dnsmasq + the DNS/volume sync loop, and the scheduler."""
        started = time.monotonic()
        group = self._started()
        hosts = self._path("cluster-hosts")
        hosts.write_text("")
        dnsmasq = group.launch(
            "dnsmasq",
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
                "--user=root",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={hosts}",
                f"--local=/{CLUSTER_DOMAIN}/",
                f"--listen-address={NODE_IP}",
                "--bind-interfaces",
                "--pid-file=",
            ],
        )
        self._sync = ClusterSync(self._api(), hosts, self._path("volumes"), NODE_NAME, dnsmasq.pid)
        self._sync.start()
        plane = self._control_plane()
        kubeconfig = plane.kubeconfig_for(
            self._path("scheduler.kubeconfig"), SCHEDULER_USER, {"token": plane.component_tokens[SCHEDULER_USER]}
        )
        group.launch(
            "kube-scheduler",
            [
                str(self.binaries.kube_scheduler),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
            ],
        )
        self._timed("dns, volumes, scheduler", started)

    def _start_kubelet(self) -> None:
        started = time.monotonic()
        plane = self._control_plane()
        serving = plane.issue_serving_certificate("kubelet", [NODE_IP], [NODE_NAME])
        credentials = plane.issue_client_certificate("kubelet-client", f"system:node:{NODE_NAME}", "system:nodes")
        kubeconfig = plane.kubeconfig_for(self._path("kubelet.kubeconfig"), f"system:node:{NODE_NAME}", credentials)
        port, healthz_port = free_ports(2)
        resolv = self._path("resolv.conf")
        resolv.write_text("")  # no host search domains or upstream servers leak into Pods
        config = self._path("kubelet-config.yaml")
        config.write_text(yaml.safe_dump(self._kubelet_config(port, healthz_port, resolv, serving), sort_keys=False))
        self._started().launch(
            "kubelet",
            [
                str(self.binaries.kubelet),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{self._path('containerd/containerd.sock')}",
                f"--root-dir={self._path('kubelet')}",
                # 1.20 reads Localhost profiles from /var/lib/kubelet/seccomp whatever --root-dir says: keep them ours.
                f"--seccomp-profile-root={self._path('kubelet/seccomp')}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self._started().wait_until("the node to be Ready", self._node_ready, NODE_READY_TIMEOUT)
        self._timed("kubelet (node Ready)", started)

    def _kubelet_config(self, port: int, healthz_port: int, resolv: Path, serving: tuple[Path, Path]) -> dict[str, Any]:
        plane = self._control_plane()
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(plane.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            # No systemd as PID 1 here, and cgroups v1: the cgroupfs driver, as containerd's runc uses.
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            "nodeStatusUpdateFrequency": "2s",
            "nodeStatusReportFrequency": "2s",
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            # A test machine's disk and memory are whatever they are: evict only when truly out.
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "volumePluginDir": str(self._path("kubelet/volume-plugins")),
        }

    def _node_ready(self) -> bool:
        try:
            node = CoreV1Api(self._api()).read_node(NODE_NAME)
        except ApiException:
            return False
        conditions = node.status.conditions or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    def _start_kube_proxy(self) -> None:
        started = time.monotonic()
        plane = self._control_plane()
        kubeconfig = plane.kubeconfig_for(
            self._path("kube-proxy.kubeconfig"), PROXY_USER, {"token": plane.component_tokens[PROXY_USER]}
        )
        healthz_port, metrics_port = free_ports(2)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{healthz_port}",
            "metricsBindAddress": f"127.0.0.1:{metrics_port}",
            # Leave the host's conntrack table sizes and timeouts alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Without bridge netfilter, a reply from a Pod to another Pod on the bridge skips the host's conntrack
            # and so its Service NAT; masquerading all Service traffic routes replies back through the host.
            "iptables": {"masqueradeAll": not self._bridge_netfilter},
        }
        path = self._path("kube-proxy-config.yaml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self._started().launch("kube-proxy", [str(self.binaries.kube_proxy), f"--config={path}", "--v=1"])
        self._started().wait_until("kube-proxy's rules", _kube_services_chain_exists, 60)
        self._timed("kube-proxy", started)

    def _started(self) -> ProcessGroup:
        if self._group is None:
            raise LocalNodeError("local node not started")
        return self._group

    def _api(self) -> ApiClient:
        if self.api is None:
            raise LocalNodeError("local node not started")
        return self.api


def _kube_services_chain_exists() -> bool:
    return ":KUBE-SERVICES " in hostnet.run("iptables-save", "-t", "nat", check=False)
