"""Start and stop a throwaway Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

Everything an instance needs lives in one temporary directory (CA and serving certificate, service-account
key, static token file, etcd data, kubeconfig, one log per process) that stop() removes. Each instance
picks its own free ports, so several can run side by side. Typical use::

    with ControlPlane().start(with_controller_manager=True) as kube:
        api = kubernetes.config.new_client_from_config(config_file=str(kube.kubeconfig))

The kubeconfig has two contexts: ``admin`` (the default; group system:masters) and ``test-user`` (no
permissions beyond what RBAC gives every authenticated user), with the tokens ``admin_token`` and
``user_token``.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from singularity_stack.postgres.cluster import free_port
from singularity_stack_testing import ROOT

from . import pki
from .processes import ProcessGroup

KUBE_VERSION = "1.20.2"
DEFAULT_CACHE = Path("/var/cache/singularity-stack") / f"kubernetes-{KUBE_VERSION}"
BUILD_SCRIPT = ROOT / "scripts" / "build-kubernetes.sh"

SERVICE_CLUSTER_IP_RANGE = "198.19.0.0/16"
# The in-cluster `kubernetes` Service gets the range's first address; the serving certificate names it.
KUBERNETES_SERVICE_IP = "198.19.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "admin"
TEST_USER = "test-user"
# Users the bootstrap RBAC policy already grants what these components need.
SCHEDULER_USER = "system:kube-scheduler"
PROXY_USER = "system:kube-proxy"

ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
# Audit only writes, once each (when the response is complete), without request or response bodies.
AUDIT_WRITES_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {"level": "None"},
    ],
}

START_TIMEOUT = 90.0


class ControlPlaneError(RuntimeError):
    """A component failed to start or died; the message carries the tail of its log."""


class BinariesMissing(ControlPlaneError):
    """kube-apiserver, kube-controller-manager or etcd is not installed (see scripts/build-kubernetes.sh)."""


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    etcd: Path


def cache_dir() -> Path:
    """Where scripts/build-kubernetes.sh puts the binaries (env SINGULARITY_KUBE_CACHE overrides)."""
    return Path(os.environ.get("SINGULARITY_KUBE_CACHE") or DEFAULT_CACHE)


def find_binaries() -> Binaries:
    """The cached kube-apiserver and kube-controller-manager, and Debian's etcd; BinariesMissing names the fix."""
    bin_dir = cache_dir() / "bin"
    binaries = Binaries(
        kube_apiserver=bin_dir / APISERVER,
        kube_controller_manager=bin_dir / CONTROLLER_MANAGER,
        etcd=Path(shutil.which(ETCD) or "/usr/bin/etcd"),
    )
    missing = [str(path) for path in vars(binaries).values() if not os.access(path, os.X_OK)]
    if missing:
        raise BinariesMissing(
            f"missing {', '.join(missing)}; run {BUILD_SCRIPT} once on this machine: it installs etcd-server and "
            f"builds kube-apiserver and kube-controller-manager {KUBE_VERSION} from Debian's source into {bin_dir} "
            "(about 5 minutes)"
        )
    return binaries


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports for servers started next, distinct, outside the ephemeral range (see free_port)."""
    return [free_port(host) for _ in range(count)]


KUBERNETES_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local")  # fmt: skip


def _make_pki(workdir: Path, address: str) -> None:
    """The CA, the API server's serving certificate, its client certificate for kubelets, the service-account key."""
    pki.make_ca(workdir)
    names = pki.subject_alt_names(sorted({"127.0.0.1", address, KUBERNETES_SERVICE_IP}), KUBERNETES_NAMES)
    pki.issue(workdir, "apiserver", "kube-apiserver", server_names=names)
    # How the API server authenticates to kubelets (logs, exec, port-forward); kubelets authorise it by group.
    pki.issue(workdir, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", organization="system:masters",
              client=True)  # fmt: skip
    pki.make_service_account_key(workdir)


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager on demand) in a temporary directory, on free ports.

    Without a kubelet or scheduler, Pods stay Pending; the controller-manager (start_controller_manager()) runs
    garbage collection of owned objects, namespace deletion, Deployments' ReplicaSets and so on. It rediscovers
    API resources only every 30 s, so owner references across kinds of CRDs created after it started take up to
    that long to be honoured: create CRDs first when that matters.

    For a cluster with nodes (kube/localnode.py), ``address`` is the node IP the server binds and advertises
    (Pods reach it through the ``kubernetes`` Service) and ``service_account_tokens=True`` turns on the
    ServiceAccount admission plugin, so Pods get their tokens as on a real cluster. Kubelets authenticate with
    client certificates from :meth:`issue_client_certificate` and are authorised by the Node authorizer.

    ``audit_writes=True`` has the server keep an audit log of every write request (create, update, patch,
    delete): :meth:`api_writes` reads it, so a test or bench sees from outside what a client wrote.
    """

    # The kubeconfig's contexts are named after these users.
    admin_user = ADMIN_USER
    test_user = TEST_USER

    def __init__(
        self,
        binaries: Binaries | None = None,
        *,
        workdir_parent: Path | None = None,
        controllers: Sequence[str] = ("*",),
        start_timeout: float = START_TIMEOUT,
        keep_workdir: bool = False,
        address: str = "127.0.0.1",
        service_account_tokens: bool = False,
        audit_writes: bool = False,
    ) -> None:
        self.binaries = binaries or find_binaries()
        self.controllers = tuple(controllers)
        self.start_timeout = start_timeout
        self.keep_workdir = keep_workdir
        self.address = address
        self.service_account_tokens = service_account_tokens
        self.audit_writes = audit_writes
        self._workdir_parent = workdir_parent
        self.workdir: Path | None = None
        self.admin_token = secrets.token_urlsafe(24)
        self.user_token = secrets.token_urlsafe(24)
        self.component_tokens = {user: secrets.token_urlsafe(24) for user in (SCHEDULER_USER, PROXY_USER)}
        self._group: ProcessGroup | None = None
        self._server: str | None = None
        self._etcd_port = self._etcd_peer_port = self._apiserver_port = 0
        self._opener = urllib.request.build_opener()
        self.startup_seconds: dict[str, float] = {}

    # --- public API -------------------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        if self._server is None:
            raise ControlPlaneError("control plane not started")
        return self._server

    @property
    def kubeconfig(self) -> Path:
        return self._path("kubeconfig")

    @property
    def ca_file(self) -> Path:
        return self._path("ca.crt")

    @property
    def running(self) -> bool:
        return self._group is not None and self._group.running

    def start(self, with_controller_manager: bool = False) -> Self:
        """Start etcd and kube-apiserver and wait until /readyz answers; stop everything if that fails."""
        if self._group is not None:
            raise ControlPlaneError("control plane already started")
        atexit.register(self.stop)
        try:
            self._prepare()
            self._start_etcd()
            self._start_apiserver()
            if with_controller_manager:
                self.start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def start_controller_manager(self) -> None:
        """Start kube-controller-manager (idempotent) and wait until it holds its leader lease."""
        group = self._started()
        if CONTROLLER_MANAGER in group:
            return
        started = time.monotonic()
        argv = [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={self.kubeconfig}",
            # No serving: nothing here scrapes it, and two instances must not fight over port 10252/10257.
            "--port=0",
            "--secure-port=0",
            f"--controllers={','.join(self.controllers)}",
            "--use-service-account-credentials=false",
            # With these, every ServiceAccount gets its token Secret, as on a real cluster.
            f"--service-account-private-key-file={self._path('sa.key')}",
            f"--root-ca-file={self.ca_file}",
        ]
        group.launch(CONTROLLER_MANAGER, argv)
        # It acquires the lease right before it starts its controllers (a fresh cluster has no other holder).
        lease = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-controller-manager"
        try:
            self._wait_until("kube-controller-manager's leader lease", lambda: self._get(lease)[0] == 200)
        except ControlPlaneError:
            # Leave etcd and the API server up (they are fine), and let a later call try again.
            group.kill(CONTROLLER_MANAGER)
            raise
        self.startup_seconds[CONTROLLER_MANAGER] = time.monotonic() - started

    def stop(self) -> None:
        """Kill the process group (SIGTERM, then SIGKILL) and remove the temporary directory. Idempotent."""
        atexit.unregister(self.stop)
        if self._group is not None:
            self._group.stop()
        self._group = None
        self._server = None
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def api_writes(self, user: str | None = None) -> list[dict[str, Any]]:
        """The write requests the server has answered so far, oldest first (audit events at Metadata level:
        verb, user, objectRef, responseStatus, ...); only ``user``'s if given. Needs ``audit_writes=True``."""
        if not self.audit_writes:
            raise ControlPlaneError("api_writes() needs ControlPlane(audit_writes=True)")
        log = self._path("audit.log")
        events = [json.loads(line) for line in log.read_text().splitlines() if line] if log.exists() else []
        return [event for event in events if user is None or event["user"]["username"] == user]

    def log_tail(self, component: str, lines: int = 40) -> str:
        return self._started().log_tail(component, lines)

    def memory_rss(self) -> dict[str, int]:
        """Resident memory in bytes of each running component (from /proc)."""
        return self._group.memory_rss() if self._group is not None else {}

    def kubeconfig_for(self, path: Path, user: str, credentials: dict[str, str]) -> Path:
        """Write a kubeconfig for one user (``{"token": ...}`` or client-certificate/-key paths) to ``path``."""
        return self._write_kubeconfig(path, [(user, credentials, None)])

    def issue_client_certificate(self, name: str, user: str, group: str = "") -> dict[str, str]:
        """A client certificate signed by the cluster CA (user from CN, group from O), as kubeconfig credentials."""
        pki.issue(self._path(""), name, user, organization=group, client=True)
        return {"client-certificate": str(self._path(f"{name}.crt")), "client-key": str(self._path(f"{name}.key"))}

    def issue_serving_certificate(
        self, name: str, ips: Sequence[str], dns_names: Sequence[str] = ()
    ) -> tuple[Path, Path]:
        """A serving certificate signed by the cluster CA: the paths of the certificate and of its key."""
        pki.issue(self._path(""), name, name, server_names=pki.subject_alt_names(ips, dns_names))
        return self._path(f"{name}.crt"), self._path(f"{name}.key")

    def __enter__(self) -> Self:
        if self._group is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- setup ------------------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("control plane not started")
        return self.workdir / name

    def _started(self) -> ProcessGroup:
        if self._group is None:
            raise ControlPlaneError("control plane not started")
        return self._group

    def _prepare(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-control-plane-", dir=self._workdir_parent))
        self._group = ProcessGroup(self.workdir, ControlPlaneError)
        self._etcd_port, self._etcd_peer_port = free_ports(2)
        (self._apiserver_port,) = free_ports(1, self.address)
        self._server = f"https://{self.address}:{self._apiserver_port}"
        try:
            _make_pki(self.workdir, self.address)
        except pki.PkiError as exc:
            raise ControlPlaneError(str(exc)) from None
        # Static tokens: token,user,uid,"groups". system:masters bypasses RBAC; the test user has only what RBAC
        # grants every authenticated user; the components' users are bound by the bootstrap policy.
        lines = [
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"',
            f"{self.user_token},{TEST_USER},{TEST_USER}",
            *(f"{token},{user},{user}" for user, token in self.component_tokens.items()),
        ]
        self._path("tokens.csv").write_text("\n".join(lines) + "\n")
        self._write_kubeconfig(
            self.kubeconfig,
            [(ADMIN_USER, {"token": self.admin_token}, None), (TEST_USER, {"token": self.user_token}, "default")],
        )
        # Never let an HTTPS_PROXY from the environment intercept the readiness checks.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.ca_file))),
        )

    def _write_kubeconfig(self, path: Path, users: list[tuple[str, dict[str, str], str | None]]) -> Path:
        """A kubeconfig with one context per (user, credentials, namespace); the first is the current one."""
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority-data": ca_data}}],
            "users": [{"name": user, "user": credentials} for user, credentials, _ in users],
            "contexts": [
                {"name": user, "context": {"cluster": "test", "user": user, **({"namespace": ns} if ns else {})}}
                for user, _, ns in users
            ],
            "current-context": users[0][0],
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    # --- components -------------------------------------------------------------------------------------------

    def _start_etcd(self) -> None:
        started = time.monotonic()
        client_url = f"http://127.0.0.1:{self._etcd_port}"
        peer_url = f"http://127.0.0.1:{self._etcd_peer_port}"
        argv = [
            str(self.binaries.etcd),
            "--name=default",
            f"--data-dir={self._path('etcd-data')}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--logger=zap",
            "--log-level=warn",
        ]
        self._started().launch(ETCD, argv)
        self._wait_until("etcd /health", lambda: b'"health":"true"' in self._get(f"{client_url}/health")[1])
        self.startup_seconds[ETCD] = time.monotonic() - started

    def _start_apiserver(self) -> None:
        started = time.monotonic()
        # The ServiceAccount admission plugin rejects Pods until the controller-manager has minted a token for
        # the namespace's default ServiceAccount; without it Pods (and Deployments' Pods) are accepted at once.
        admission = "--enable-admission-plugins=NodeRestriction" if self.service_account_tokens else (
            "--disable-admission-plugins=ServiceAccount")  # fmt: skip
        argv = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self._etcd_port}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={self._apiserver_port}",
            # 1.20 still opens an unauthenticated port 8080 by default; two instances would collide on it.
            "--insecure-port=0",
            f"--tls-cert-file={self._path('apiserver.crt')}",
            f"--tls-private-key-file={self._path('apiserver.key')}",
            f"--cert-dir={self._path('certs')}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={self._path('tokens.csv')}",
            "--authorization-mode=Node,RBAC",
            f"--kubelet-client-certificate={self._path('apiserver-kubelet-client.crt')}",
            f"--kubelet-client-key={self._path('apiserver-kubelet-client.key')}",
            f"--kubelet-certificate-authority={self.ca_file}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={self._path('sa.pub')}",
            f"--service-account-signing-key-file={self._path('sa.key')}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            admission,
            "--allow-privileged=true",
            "--profiling=false",
        ]
        if self.audit_writes:
            self._path("audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_WRITES_POLICY))
            argv += [
                f"--audit-policy-file={self._path('audit-policy.yaml')}",
                f"--audit-log-path={self._path('audit.log')}",
                "--audit-log-mode=blocking",  # an event is in the file before the response goes out
            ]
        self._started().launch(APISERVER, argv)
        self._wait_until("kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200)
        self.startup_seconds[APISERVER] = time.monotonic() - started

    # --- waiting ----------------------------------------------------------------------------------------------

    def _get(self, url_or_path: str) -> tuple[int, bytes]:
        """GET as admin; (0, b"") while the server does not answer at all."""
        url = url_or_path if url_or_path.startswith("http") else self.server + url_or_path
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with self._opener.open(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def _wait_until(self, what: str, ready: Callable[[], bool]) -> None:
        self._started().wait_until(what, ready, self.start_timeout)
