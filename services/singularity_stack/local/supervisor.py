"""Running every service of a local stack as a child process: start, wait until ready, restart, stop.

Each service is `python -m singularity_stack.cli run <service>` with its settings in the
environment, exactly as the container image runs it; its JSON logs go to `<state>/logs/<name>.log`.
A service that dies is restarted (it recovers its work from the queue and its database), and so is
PostgreSQL (`PostgresProcess`, the postmaster run in the foreground as a child like the services).
Every child runs in its own process group, gets SIGTERM (PostgreSQL: SIGINT, its fast shutdown) if `up`
dies, and is recorded in `<state>/children.json` (pid, process group, start time) so that a later `up`
can stop what a killed one left behind (`stop_recorded`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from singularity_stack.postgres.cluster import LocalCluster, free_port
from singularity_stack.provision.credentials import ServiceCredentials
from singularity_stack.securefile import private_dir, write_private


@dataclass
class ServiceProcess:
    name: str  # "nexus", "singularity_2", ...
    role: str  # the service to run: singularity, nexus, genesis or centralcloud
    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)
    stop_signal: int = field(default=signal.SIGTERM, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "singularity_stack.cli", "run", self.role]

    def popen_options(self) -> dict[str, Any]:
        return {}

    def open_log(self) -> IO[bytes]:
        private_dir(self.log_path.parent)  # logs may quote secrets: ours alone, and no planted names in it
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(self.log_path, flags, 0o600), "ab")

    def start(self) -> None:
        if self._log:
            self._log.close()  # a restart: the previous process's handle
        self._log = self.open_log()
        self.started_at = time.monotonic()
        stop_signal = self.stop_signal
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to the supervisor, which stops children in order
            preexec_fn=lambda: _die_with_parent(stop_signal),
            **self.popen_options(),
        )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _kill_group(self.process.pid)  # whatever the service started and left in its group
        if self._log:
            self._log.close()

    def record(self) -> dict[str, object] | None:
        """What a later `up` needs to recognise and stop this process: pid, group, start time, signal."""
        if self.process is None or self.process.poll() is not None:
            return None
        pid = self.process.pid
        return {"pid": pid, "pgid": pid, "start_time": process_start_time(pid), "signal": int(self.stop_signal)}


class PostgresProcess(ServiceProcess):
    """The local cluster's postmaster, in the foreground as `up`'s child (not daemonized by pg_ctl), so that
    the supervisor sees it die and restarts it like a service. SIGINT is its fast shutdown."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__("postgres", "postgres", cluster.installation.environment(), cluster.port, cluster.logfile)
        self.cluster = cluster
        self.stop_signal = signal.SIGINT

    @property
    def url(self) -> str:
        return f"postgresql://{self.cluster.host}:{self.port}"

    def command(self) -> list[str]:
        return self.cluster.server_command()

    def popen_options(self) -> dict[str, Any]:
        account = self.cluster.account
        return {"cwd": "/", "user": account.pw_uid, "group": account.pw_gid} if account else {"cwd": "/"}

    def open_log(self) -> IO[bytes]:
        return self.cluster.open_log()

    def ready(self) -> bool:
        return self.cluster.accepts_connections()


_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> None:
    """In the child, before exec: the kernel sends `sig` when `up` dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat): with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def stop_recorded(path: Path, report: Callable[[str], None], timeout: float = 20.0) -> list[str]:
    """Stop the children a previous `up` recorded in `path` and left running (it was killed): each is
    signalled only if its pid still names the same process (same start time), then its group is killed."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    alive: dict[str, dict[str, Any]] = {}
    for name, entry in recorded.items() if isinstance(recorded, dict) else ():
        try:
            pid, pgid, sig = int(entry["pid"]), int(entry["pgid"]), int(entry["signal"])
        except (KeyError, TypeError, ValueError):
            continue
        if entry.get("start_time") and process_start_time(pid) == entry["start_time"]:
            report(f"  stopping {name} (pid {pid}), left running by an earlier `up`")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            alive[name] = {"pid": pid, "pgid": pgid, "start_time": entry["start_time"]}
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        for name, entry in list(alive.items()):
            if process_start_time(entry["pid"]) != entry["start_time"]:
                _kill_group(entry["pgid"])
                del alive[name]
        time.sleep(0.1)
    for entry in alive.values():
        _kill_group(entry["pgid"])
    path.unlink(missing_ok=True)
    return sorted(recorded) if isinstance(recorded, dict) else []


# What a service process gets from `up`'s environment: nothing else, so a secret of `up`'s (a provider key,
# a cloud credential) reaches only the service that uses it. Values `up` sets itself are added on top.
PROCESS_ENV = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LOG_LEVEL"})  # and LC_*
# Each service's settings: the validation_alias names of its settings class (tests/test_service_env.py
# checks this table against the classes, which are not imported here: Nexus's pulls in litellm).
COMMON_SETTINGS_ENV = frozenset({"LOG_LEVEL", "SHUTDOWN_GRACE_SECONDS", "ALLOWED_HOSTS", "MAX_BODY_BYTES", "POOL_SIZE"})
# A service's connections and address are `up`'s own: set by the plan, never taken from the environment.
# So are the stack's names and its NATS side (`up --messaging`, each service's own NATS password).
SET_BY_UP_ENV = frozenset({"DATABASE_URL", "SHARED_QUEUE_DB_URL", "SHARED_QUEUE_URL", "HOST", "PORT"}) | {
    *("MESSAGING_MODE", "NATS_URL", "NATS_PASSWORD", "SINGULARITY_INSTANCES", "STACK_PREFIX")
}


@dataclass(frozen=True)
class Messaging:
    """`up --messaging MODE --nats-url URL`: the mode, and every service's NATS password by logical name."""

    mode: str = "pgmq"
    nats_url: str = ""
    passwords: Mapping[str, str] = field(default_factory=dict)


SETTINGS_ENV: dict[str, frozenset[str]] = {
    "singularity": frozenset(
        {
            "SINGULARITY_INSTANCE",
            "SINGULARITY_API_TOKEN",
            "LLM_TIMEOUT_SECONDS",
            "JOB_TIMEOUT_SECONDS",
            "HUMAN_TIMEOUT_SECONDS",
            "DAILY_LLM_BUDGET_USD",
            "LLM_REQUESTS_PER_MINUTE",
            "NEXUS_CONSOLE_URL",
            "SINGULARITY_PUBLISH_TO",
        }
    ),
    "nexus": frozenset(
        {
            "NEXUS_UI_TOKEN",
            "NEXUS_REVIEWERS_FILE",
            "NEXUS_ROUTING_CONFIG",
            "NEXUS_MAX_CONCURRENT_LLM",
            "HITL_EXPIRY_INTERVAL_SECONDS",
            "NEXUS_SINGULARITY_CONSOLE_URLS",
        }
    ),
    "genesis": frozenset({"GENESIS_MAX_CONCURRENT_JOBS", "GENESIS_SANDBOX_PROC", "GENESIS_SANDBOX"}),
    "centralcloud": frozenset(
        {
            "SHARED_QUEUE_ANALYTICS_URL",
            "CENTRALCLOUD_API_TOKEN",
            "SHARED_QUEUE_RETENTION_DAYS",
            "SINGULARITY_INSTANCES",
            "STACK_PREFIX",
            "PRUNE_INTERVAL_SECONDS",
            "ANALYTICS_INTERVAL_SECONDS",
            "METRICS_INTERVAL_SECONDS",
            "ARCHIVE_CHECK_INTERVAL_SECONDS",
            "CONSOLE_REFRESH_SECONDS",
            "QUEUE_SAMPLE_RETENTION_HOURS",
        }
    ),
}
# Nexus alone talks to LLM providers, through a proxy and CA bundle where the host has them.
NEXUS_NETWORK_ENV = frozenset(
    {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"}
    | {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"}
)


def provider_env(source: Mapping[str, str]) -> frozenset[str]:
    """The provider keys Nexus's routing config asks for (`requires_env` and `os.environ/NAME` of its models):
    the config that decides a model's key is missing is the one place that says which keys Nexus gets."""
    from singularity_stack.nexus.routing_config import load_routing_config

    path = source.get("NEXUS_ROUTING_CONFIG")
    config = load_routing_config(Path(path) if path else None)
    return frozenset(name for model in config.models for name in model.required_env)


def allowed_env(role: str, source: Mapping[str, str]) -> frozenset[str]:
    """The names a `role` service may receive from `source` (besides LC_*)."""
    names = PROCESS_ENV | COMMON_SETTINGS_ENV | SETTINGS_ENV[role]
    if role == "nexus":
        names |= NEXUS_NETWORK_ENV | provider_env(source)
    return names


def service_env(role: str, source: Mapping[str, str]) -> dict[str, str]:
    """The part of `source` (normally `up`'s environment) that a `role` service may see."""
    names = allowed_env(role, source)
    return {key: value for key, value in source.items() if key in names or key.startswith("LC_")}


def plan_services(
    credentials: dict[str, ServiceCredentials],
    state_dir: Path,
    *,
    instances: int,
    ui_token: str,
    prefix: str = "",
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
    source_env: Mapping[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
    workers: Mapping[str, int] | None = None,
    messaging: Messaging | None = None,
) -> list[ServiceProcess]:
    """One process per service and per Singularity instance, each with its own port and settings; `workers`
    runs more processes of a shared service (e.g. {"nexus": 2}: "nexus" and "nexus-2", one database and
    role, sharing the work through the queue).

    Each gets only its share of `source_env` (default: our environment, see `service_env`), then its
    settings, then `extra_env[role]` and `extra_env[name]` (e.g. "singularity", "singularity_2"): variables
    given explicitly for that service, passed whatever their name. `ports` gives a service (by name) its
    port; the others get a free one.
    """
    source = os.environ if source_env is None else source_env
    explicit = dict(extra_env or {})
    if any(not isinstance(values, Mapping) for values in explicit.values()):  # a flat dict would be ignored
        raise TypeError("extra_env maps a service (role or name) to its variables")
    shares = {role: service_env(role, source) for role in SETTINGS_ENV}
    plans = []
    processes = [(name, name, creds) for name, creds in credentials.items()]
    for service, count in (workers or {}).items():
        processes += [(f"{service}-{i}", service, credentials[service]) for i in range(2, count + 1)]
    for name, logical, creds in processes:
        role = "singularity" if logical.startswith("singularity_") else logical
        env = {
            **shares[role],
            "HOST": "127.0.0.1",
            "DATABASE_URL": creds.database_url,
            "SHARED_QUEUE_DB_URL": creds.shared_queue_url,
        }
        if role == "singularity":
            env["SINGULARITY_INSTANCE"] = name
        # Every service knows the stack's names: NATS subjects carry them (dual operation and cutover).
        env |= {"SINGULARITY_INSTANCES": str(instances), "STACK_PREFIX": prefix}
        if role == "centralcloud":
            env["SHARED_QUEUE_ANALYTICS_URL"] = creds.shared_queue_analytics_url or ""
        if messaging is not None and messaging.mode != "pgmq":
            env |= {
                "MESSAGING_MODE": messaging.mode,
                "NATS_URL": messaging.nats_url,
                "NATS_PASSWORD": messaging.passwords[logical],
            }
        if role == "nexus":
            env["NEXUS_UI_TOKEN"] = ui_token
        port = (ports or {}).get(name) or free_port()
        env["PORT"] = str(port)
        for key in (role, name):
            env |= explicit.get(key, {})
        plans.append(ServiceProcess(name, role, env, port, state_dir / "logs" / f"{name}.log"))
    # CentralCloud first: it owns the queues the others use.
    return sorted(plans, key=lambda p: (p.role != "centralcloud", p.name))


# Restarts back off as Kubernetes' CrashLoopBackOff does: a service that keeps dying right after it starts is
# retried after 5 s, 10 s, 20 s, ... up to 5 minutes; one that ran for a minute before dying restarts at once.
RESTART_BACKOFF_S = 5.0
MAX_RESTART_BACKOFF_S = 300.0
STABLE_RUN_S = 60.0


def restart_delay(crashes_in_a_row: int) -> float:
    """Seconds to wait before restarting a service that died after ``crashes_in_a_row`` short runs."""
    if crashes_in_a_row <= 0:
        return 0.0
    return min(RESTART_BACKOFF_S * 2.0 ** (crashes_in_a_row - 1), MAX_RESTART_BACKOFF_S)


@dataclass
class _Restart:
    due: float
    crashes_in_a_row: int


class Supervisor:
    def __init__(
        self,
        services: list[ServiceProcess],
        report: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        *,
        record_file: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.services = services
        self.report = report
        self.clock = clock
        self.record_file = record_file
        self.should_stop = should_stop
        self._pending: dict[str, _Restart] = {}  # services that died, waiting out their back-off
        self._crashes: dict[str, int] = {}

    def record(self) -> None:
        """Write every running child's pid, group and start time to `record_file` (for a later `up`)."""
        if self.record_file is None:
            return
        entries = {s.name: entry for s in self.services if (entry := s.record())}
        write_private(self.record_file, json.dumps(entries, indent=2))

    def start_all(self, timeout: float = 120.0, services: list[ServiceProcess] | None = None) -> None:
        """Start every service (or those given, which join the supervised ones) and wait until each answers
        /readyz, reporting progress as they come up; `should_stop` abandons the wait."""
        started = time.monotonic()
        starting = self.services if services is None else services
        if services is not None:
            self.services.extend(s for s in services if s not in self.services)
        for service in starting:
            service.start()
        self.record()
        waiting = {s.name: s for s in starting}
        while waiting and not self.should_stop():
            for name, service in list(waiting.items()):
                code = service.exited()
                if code is not None:
                    raise RuntimeError(
                        f"{name} exited with code {code} while starting; see {service.log_path}:\n"
                        + tail(service.log_path)
                    )
                if service.ready():
                    self.report(f"  {name:<16} ready at {service.url}  ({time.monotonic() - started:.1f}s)")
                    del waiting[name]
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(waiting)}")
            time.sleep(0.1)

    def watch_once(self) -> None:
        """Restart any service that died, once its back-off has passed."""
        now = self.clock()
        for service in self.services:
            code = service.exited()
            if code is None:
                continue
            pending = self._pending.get(service.name)
            if pending is None:
                ran_for = now - service.started_at
                crashes = 0 if ran_for >= STABLE_RUN_S else self._crashes.get(service.name, 0) + 1
                self._crashes[service.name] = crashes
                pending = self._pending[service.name] = _Restart(now + restart_delay(crashes), crashes)
                self.report(
                    f"{service.name} exited with code {code} after {ran_for:.0f}s; restarting in "
                    f"{restart_delay(crashes):.0f}s" + (f" ({crashes} short runs in a row)" if crashes else "")
                )
            if now >= pending.due:
                del self._pending[service.name]
                service.restarts += 1
                service.start()
                service.started_at = now  # on the supervisor's clock, which measures the next run
                self.record()

    def stop_all(self, timeout: float = 20.0) -> None:
        # Singularity instances first (they send), CentralCloud after them (it owns the queues), PostgreSQL
        # (first in the list when `up` runs it) last, once no service is connected.
        servers = [s for s in self.services if isinstance(s, PostgresProcess)]
        services = [s for s in reversed(self.services) if s not in servers]
        for group in (services, servers):
            for service in group:
                service.terminate()
            deadline = time.monotonic() + timeout
            for service in group:
                service.wait(max(deadline - time.monotonic(), 0.1))
        if self.record_file is not None:
            self.record_file.unlink(missing_ok=True)

    def state(self) -> dict[str, object]:
        return {
            s.name: {"url": s.url, "pid": s.process.pid if s.process else None}
            for s in self.services
            if not isinstance(s, PostgresProcess)
        }


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_state(path: Path, data: dict[str, object]) -> None:
    write_private(path, json.dumps(data, indent=2))  # it holds the UI token
