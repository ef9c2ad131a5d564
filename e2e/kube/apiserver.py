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
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import yaml

KUBE_VERSION = "1.20.2"
DEFAULT_CACHE = Path("/var/cache/singularity-stack") / f"kubernetes-{KUBE_VERSION}"
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-kube-apiserver.sh"

SERVICE_CLUSTER_IP_RANGE = "198.19.0.0/16"
# The in-cluster `kubernetes` Service gets the range's first address; the serving certificate names it.
KUBERNETES_SERVICE_IP = "198.19.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "admin"
TEST_USER = "test-user"

ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"

START_TIMEOUT = 90.0
STOP_GRACE = 5.0
LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """A component failed to start or died; the message carries the tail of its log."""


class BinariesMissing(ControlPlaneError):
    """kube-apiserver, kube-controller-manager or etcd is not installed (see scripts/build-kube-apiserver.sh)."""


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    etcd: Path


def cache_dir() -> Path:
    """Where scripts/build-kube-apiserver.sh puts the binaries (env SINGULARITY_KUBE_CACHE overrides)."""
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


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are bound, so the kernel cannot hand out the same port twice.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _openssl(workdir: Path, *args: str) -> None:
    try:
        result = subprocess.run(["openssl", *args], cwd=workdir, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ControlPlaneError("the openssl command is missing (Debian package openssl)") from None
    if result.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_SERVING_EXTENSIONS = f"""\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost, IP:{KUBERNETES_SERVICE_IP}, DNS:kubernetes, DNS:kubernetes.default, \
DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
"""


def _make_pki(workdir: Path) -> None:
    """A CA, a serving certificate it signs for 127.0.0.1, and the service-account signing key (all EC: fast)."""
    _openssl(
        workdir,
        *("req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7"),
        *("-subj", "/CN=singularity-stack test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    _openssl(
        workdir,
        *("req", "-new", *_EC_KEY, "-keyout", "apiserver.key", "-out", "apiserver.csr"),
        *("-subj", "/CN=kube-apiserver"),
    )
    (workdir / "apiserver.ext").write_text(_SERVING_EXTENSIONS)
    _openssl(
        workdir,
        *("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "7"),
        *("-set_serial", str(secrets.randbits(63)), "-extfile", "apiserver.ext", "-out", "apiserver.crt"),
    )
    _openssl(workdir, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")
    _openssl(workdir, "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the test process is killed outright, take the control plane down with it rather than leave it holding
    # ports and memory. Runs in the child between fork and exec.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager on demand) in a temporary directory, on free ports.

    Without a kubelet or scheduler, Pods stay Pending; the controller-manager (start_controller_manager()) runs
    garbage collection of owned objects, namespace deletion, Deployments' ReplicaSets and so on. It rediscovers
    API resources only every 30 s, so owner references across kinds of CRDs created after it started take up to
    that long to be honoured: create CRDs first when that matters.
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
    ) -> None:
        self.binaries = binaries or find_binaries()
        self.controllers = tuple(controllers)
        self.start_timeout = start_timeout
        self.keep_workdir = keep_workdir
        self._workdir_parent = workdir_parent
        self.workdir: Path | None = None
        self.admin_token = secrets.token_urlsafe(24)
        self.user_token = secrets.token_urlsafe(24)
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._pgid: int | None = None
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
        return bool(self._processes) and all(proc.poll() is None for proc in self._processes.values())

    def start(self, with_controller_manager: bool = False) -> Self:
        """Start etcd and kube-apiserver and wait until /readyz answers; stop everything if that fails."""
        if self._processes:
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
        if CONTROLLER_MANAGER in self._processes:
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
        self._launch(CONTROLLER_MANAGER, argv)
        # It acquires the lease right before it starts its controllers (a fresh cluster has no other holder).
        lease = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-controller-manager"
        try:
            self._wait_until("kube-controller-manager's leader lease", lambda: self._get(lease)[0] == 200)
        except ControlPlaneError:
            # Leave etcd and the API server up (they are fine), and let a later call try again.
            proc = self._processes.pop(CONTROLLER_MANAGER)
            proc.kill()
            proc.wait()
            raise
        self.startup_seconds[CONTROLLER_MANAGER] = time.monotonic() - started

    def stop(self) -> None:
        """Kill the process group (SIGTERM, then SIGKILL) and remove the temporary directory. Idempotent."""
        atexit.unregister(self.stop)
        if self._pgid is not None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE
            for proc in self._processes.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            # SIGKILL also catches anything a component forked into the group.
            self._signal_group(signal.SIGKILL)
            for proc in self._processes.values():
                proc.wait()
        self._processes.clear()
        self._pgid = None
        self._server = None
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, component: str, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self._path(f"{component}.log"), lines)

    def memory_rss(self) -> dict[str, int]:
        """Resident memory in bytes of each running component (from /proc)."""
        usage = {}
        for name, proc in self._processes.items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        usage[name] = int(line.split()[1]) * 1024
        return usage

    def __enter__(self) -> Self:
        if not self._processes:
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

    def _prepare(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-control-plane-", dir=self._workdir_parent))
        self._etcd_port, self._etcd_peer_port, self._apiserver_port = _free_ports(3)
        self._server = f"https://127.0.0.1:{self._apiserver_port}"
        _make_pki(self.workdir)
        # Static tokens: name,uid,"groups". system:masters bypasses RBAC; the test user has only what RBAC grants.
        self._path("tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n{self.user_token},{TEST_USER},{TEST_USER}\n'
        )
        self._write_kubeconfig()
        # Loopback only: never let an HTTPS_PROXY from the environment intercept the readiness checks.
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(self.ca_file))),
        )

    def _write_kubeconfig(self) -> None:
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority-data": ca_data}}],
            "users": [
                {"name": ADMIN_USER, "user": {"token": self.admin_token}},
                {"name": TEST_USER, "user": {"token": self.user_token}},
            ],
            "contexts": [
                {"name": ADMIN_USER, "context": {"cluster": "test", "user": ADMIN_USER}},
                {"name": TEST_USER, "context": {"cluster": "test", "user": TEST_USER, "namespace": "default"}},
            ],
            "current-context": ADMIN_USER,
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

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
        self._launch(ETCD, argv)
        self._wait_until("etcd /health", lambda: b'"health":"true"' in self._get(f"{client_url}/health")[1])
        self.startup_seconds[ETCD] = time.monotonic() - started

    def _start_apiserver(self) -> None:
        started = time.monotonic()
        argv = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self._etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self._apiserver_port}",
            # 1.20 still opens an unauthenticated port 8080 by default; two instances would collide on it.
            "--insecure-port=0",
            f"--tls-cert-file={self._path('apiserver.crt')}",
            f"--tls-private-key-file={self._path('apiserver.key')}",
            f"--cert-dir={self._path('certs')}",
            f"--token-auth-file={self._path('tokens.csv')}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={self._path('sa.pub')}",
            f"--service-account-signing-key-file={self._path('sa.key')}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # The ServiceAccount admission plugin rejects Pods until the controller-manager has minted a token for
            # the namespace's default ServiceAccount; without it Pods (and Deployments' Pods) are accepted at once.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--profiling=false",
        ]
        self._launch(APISERVER, argv)
        self._wait_until("kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200)
        self.startup_seconds[APISERVER] = time.monotonic() - started

    def _launch(self, name: str, argv: list[str]) -> None:
        # All components share the first one's process group, so stop() can signal them together.
        # PDEATHSIG fires when the *thread* that forked exits, so only ask for it from the main thread.
        in_main_thread = threading.current_thread() is threading.main_thread()
        with self._path(f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                process_group=self._pgid or 0,
                preexec_fn=_die_with_parent if in_main_thread else None,
            )
        self._processes[name] = proc
        if self._pgid is None:
            self._pgid = proc.pid

    def _signal_group(self, signum: int) -> None:
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signum)

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
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            for name, proc in self._processes.items():
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with status {proc.returncode} while waiting for {what}; "
                        f"last lines of {self._path(name + '.log')}:\n{self.log_tail(name)}"
                    )
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}:\n{self.log_tail(name)}" for name in self._processes)
                raise ControlPlaneError(f"timed out after {self.start_timeout:.0f} s waiting for {what}\n{tails}")
            time.sleep(0.1)
