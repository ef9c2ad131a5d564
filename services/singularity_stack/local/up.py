"""`singularity-stack up`: PostgreSQL and every service as supervised children, stopped however `up` ends.

The order: take the state directory's lock (one `up` per state directory), stop what a killed `up` left
running (the children it recorded, and a PostgreSQL still running in the data directory), start PostgreSQL
as a supervised child, provision, start the services, then watch: a child that dies is restarted with the
supervisor's back-off. A stop signal, the output's reader going away or the parent's death end the watch;
every child is stopped (services first, PostgreSQL last) and the exit status says why (`lifecycle`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from singularity_stack.local import lifecycle, nats
from singularity_stack.local.supervisor import (
    PostgresProcess,
    ServiceProcess,
    Supervisor,
    plan_services,
    stop_recorded,
    write_state,
)
from singularity_stack.postgres.cluster import ClusterError, LocalCluster, free_port, server_account
from singularity_stack.provision.budget import stack_budget
from singularity_stack.reachable import Account, blocked, usable_root
from singularity_stack.securefile import private_dir, read_private, write_private


def say(line: str = "") -> None:
    print(line, flush=True)  # sys.stdout is a SafeOutput here: this never raises


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def choose_ports(state: Path, names: list[str], base: int | None) -> dict[str, int]:
    """Each of `names` ("postgres", then the services in start order) and its port: `base`, `base`+1, ...
    with --port-base; else the ones in `<state>/ports.json`, kept across restarts (a new name, or a kept port
    something else took meanwhile, gets a free one)."""
    path = state / "ports.json"
    if base is not None:
        ports = {name: base + i for i, name in enumerate(names)}
        busy = [f"{port} ({name})" for name, port in ports.items() if port_in_use(port)]
        if busy:
            raise lifecycle.UpError(f"--port-base {base}: in use: {', '.join(busy)}")
    else:
        try:
            kept = json.loads(read_private(path) or "{}")
        except ValueError:
            kept = {}
        legacy = state / "postgres-port"  # where earlier versions kept PostgreSQL's
        if "postgres" not in kept and legacy.exists():
            kept["postgres"] = int(legacy.read_text())
        ports = {}
        for name in names:
            port = kept.get(name)
            ports[name] = port if isinstance(port, int) and not port_in_use(port) else free_port()
        ports = {**{k: v for k, v in kept.items() if isinstance(v, int)}, **ports}
    write_private(path, json.dumps(ports, indent=2))
    return ports


# PostgreSQL's data, when its account cannot pass through the state directory's parents.
OUTSIDE_DATA_ROOT = Path("/var/lib/singularity-stack")


def postgres_dir(state: Path) -> tuple[Path, str | None]:
    """Where PostgreSQL's data directory is, and why it is not `<state>/postgres` (None when it is).

    As root the server runs as its own account, which must pass through every parent of its data directory.
    A state directory under a private one (a checkout in root's home, 0700) is out of its reach: the data
    then lives in a directory of this state directory's own (named by a hash of its path) under
    OUTSIDE_DATA_ROOT, which that account can reach.
    """
    server = server_account()
    if server is None:
        return state / "postgres", None
    account = Account(server.pw_uid, server.pw_gid, server.pw_name)
    problem = blocked(state, account, os.X_OK)
    if problem is None:
        return state / "postgres", None
    name = "postgres-" + hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:16]
    if not usable_root(OUTSIDE_DATA_ROOT, account):
        raise lifecycle.UpError(
            f"PostgreSQL runs as {account.describe()}, who cannot reach {state} ({problem}), and "
            f"{OUTSIDE_DATA_ROOT} is no root-owned directory it can reach: pass a --state-dir it can reach"
        )
    return OUTSIDE_DATA_ROOT / name, f"{account.name} cannot reach {state} ({problem})"


def link_consoles(services: list[ServiceProcess]) -> dict[str, str]:
    """Tell Nexus where each Singularity instance's console is and each instance where Nexus's review page is
    (for links in the pages; neither calls the other). Returns instance → console URL."""
    consoles = {s.name: s.url for s in services if s.role == "singularity"}
    nexus = next((s.url for s in services if s.role == "nexus"), None)
    for service in services:
        if service.role == "nexus":
            service.env["NEXUS_SINGULARITY_CONSOLE_URLS"] = json.dumps(consoles)
        elif service.role == "singularity" and nexus:
            service.env["NEXUS_CONSOLE_URL"] = nexus
    return consoles


def service_names(instances: int, workers: dict[str, int] | None = None) -> list[str]:
    """The services in the order `plan_services` starts them (extra workers last: --port-base keeps the
    ports of the others)."""
    names = ["centralcloud", "genesis", "nexus", *(f"singularity_{i}" for i in range(1, instances + 1))]
    for service, count in (workers or {}).items():
        names += [f"{service}-{i}" for i in range(2, count + 1)]
    return names


def workers_of(args: argparse.Namespace) -> dict[str, int]:
    return {"genesis": args.genesis_workers, "nexus": args.nexus_workers}


def run_up(args: argparse.Namespace) -> int:
    out, err = lifecycle.protect_output()
    stop = lifecycle.Stop((out, err))
    stop.install()
    # Not resolved: a symlink planted at the state directory's name must be refused, not followed. Made
    # passable for PostgreSQL's account (when it is not ours) before anything else, a running `up`'s included.
    account = None if args.admin_dsn else server_account()
    state = private_dir(args.state_dir.absolute(), traverse_gid=account.pw_gid if account else None)
    lock = lifecycle.StateLock(state)
    try:
        lock.acquire()
    except lifecycle.StateLocked as error:
        print(f"error: {error}", file=err, flush=True)
        return lifecycle.EXIT_LOCKED
    supervisor = Supervisor([], report=say, record_file=state / "children.json", should_stop=stop.check)
    try:
        return _run(args, state, stop, supervisor)
    except (lifecycle.UpError, ClusterError, RuntimeError) as error:
        print(f"error: {error}", file=err, flush=True)
        return lifecycle.EXIT_FAILED
    finally:
        if stop.reason:
            say(f"stopping ({stop.reason})")
        if any(not isinstance(s, PostgresProcess) for s in supervisor.services):
            say("stopping the services")
        if any(isinstance(s, PostgresProcess) for s in supervisor.services):
            say("stopping PostgreSQL")
        supervisor.stop_all()
        lock.release()


def _run(args: argparse.Namespace, state: Path, stop: lifecycle.Stop, supervisor: Supervisor) -> int:
    from singularity_stack import cli  # the provisioning and token helpers `up` shares with other commands
    from singularity_stack.nexus.reviewers import ReviewerFile

    nats.check(args.messaging, args.nats_url)
    left = stop_recorded(state / "children.json", say)
    datadir, moved = (state / "postgres", None) if args.admin_dsn else postgres_dir(state)
    if not args.admin_dsn:  # before the ports are chosen: a leftover server holds PostgreSQL's
        leftover = LocalCluster(datadir, port=0)  # status and stop need no port
        if leftover.initialized and leftover.running:  # an earlier `up`'s, left running (or started by hand)
            by = " by an earlier `up`" if left else ""
            say(f"  stopping the PostgreSQL left running in {leftover.datadir}{by}")
            leftover.stop()
    names = [] if args.admin_dsn else ["postgres"]
    names += [] if args.no_services else service_names(args.singularity_instances, workers_of(args))
    ports = choose_ports(state, names, args.port_base)
    admin_dsn = args.admin_dsn
    if not admin_dsn:
        # Room for every pool the stack may open (provision/budget.py), and never fewer than before.
        needed = stack_budget(args.singularity_instances, replicas=workers_of(args)).required
        cluster = LocalCluster(datadir, port=ports["postgres"], settings={"max_connections": str(max(300, needed))})
        say(
            f"[1/3] starting PostgreSQL {cluster.installation.version} ({cluster.installation.source}) "
            f"in {cluster.datadir} on port {cluster.port}"
        )
        if moved:
            say(f"  its data directory is outside the state directory: {moved}")
        cluster.init()
        supervisor.start_all(timeout=90, services=[PostgresProcess(cluster)])
        if stop.check():
            return stop.code
        admin_dsn = cluster.dsn()
        say(f"  admin DSN: {admin_dsn}")
    credentials_file = state / "credentials.json"
    say("[2/3] provisioning the databases, roles and queues:")
    result = cli._provision(admin_dsn, args.singularity_instances, credentials_file)
    say(f"  pgmq {result.pgmq.version} ({result.pgmq.method}); credentials in {credentials_file} (0600)")
    summary: dict[str, Any] = {"admin_dsn": admin_dsn, "credentials_file": str(credentials_file)}
    if args.no_services:
        for name, entry in result.credentials.items():
            say(f"{name:>16}  DATABASE_URL={entry.database_url}")
        if args.state_file:
            write_state(args.state_file, summary)
        if args.admin_dsn:
            say("provisioned; no services started (--no-services)")
            return lifecycle.EXIT_STOPPED
        say(
            "PostgreSQL is running with the stack's databases provisioned; no services were started "
            "(--no-services); press Ctrl-C to stop PostgreSQL"
        )
    else:
        if stop.check():
            return stop.code
        say("[3/3] starting the services:")
        token = cli._ui_token(state)
        api_tokens = {role: cli._state_token(state, *names) for role, names in cli.API_TOKENS.items()}
        reviewers_file = state / "reviewers.json"
        ReviewerFile(reviewers_file).ensure()
        extra_env = {role: {cli.API_TOKENS[role][0]: value} for role, value in api_tokens.items()}
        messaging, nats_users = nats.messaging(state, result.layout, args.messaging, args.nats_url)
        if nats_users:
            say(
                f"  messaging {messaging.mode} with {messaging.nats_url}; its nats-server must include {nats_users} "
                "(a path relative to its config file)"
            )
        services = plan_services(
            result.credentials,
            state,
            instances=args.singularity_instances,
            ui_token=token,
            extra_env=extra_env | {"nexus": {"NEXUS_REVIEWERS_FILE": str(reviewers_file)}},
            ports=ports,
            workers=workers_of(args),
            messaging=messaging,
        )
        consoles = link_consoles(services)
        supervisor.start_all(services=services)
        if stop.check():
            return stop.code
        nexus = next(s for s in services if s.name == "nexus")
        summary |= {
            "services": supervisor.state(),
            "ui": {"url": nexus.url + "/", "token": token, "reviewers_file": str(reviewers_file)},
            "api_tokens": api_tokens,
            "consoles": {name: url + "/" for name, url in consoles.items()},
            "logs": str(state / "logs"),
            "messaging": {"mode": messaging.mode, "nats_url": messaging.nats_url, "nats_users": str(nats_users or "")},
        }
        if args.state_file:
            write_state(args.state_file, summary)
        say(f"\nHITL UI: {nexus.url}/   token: {token}")
        say(
            f"  named reviewers (the shared token stops working once there is one): "
            f"singularity-stack reviewers add NAME --file {reviewers_file}"
        )
        for role, value in api_tokens.items():
            say(f"{role} API token: {value}   (send 'Authorization: Bearer <token>')")
        for service in services:
            say(f"  {service.name:<16} {service.url}")
        say("Singularity consoles (log in with the singularity API token):")
        for name, url in consoles.items():
            say(f"  {name:<16} {url}/")
        central = next(s for s in services if s.name == "centralcloud")
        say(f"CentralCloud console: {central.url}/   (log in with the centralcloud API token)")
        say(f"admin DSN: {admin_dsn}")
        say(f"logs in {state / 'logs'}; the stack is up; press Ctrl-C to stop")
    while not stop.wait(1.0):
        before = {s.name: s.restarts for s in supervisor.services}
        supervisor.watch_once()
        if args.state_file and "services" in summary and before != {s.name: s.restarts for s in supervisor.services}:
            summary["services"] = supervisor.state()
            write_state(args.state_file, summary)
    return stop.code
