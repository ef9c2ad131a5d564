"""The `singularity-stack` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

import psycopg

from singularity_stack.nexus.reviewers import ReviewerFile, ReviewersError
from singularity_stack.nexus.routing_config import RoutingConfigError
from singularity_stack.provision import credentials as creds
from singularity_stack.provision.migrations import applied_migrations
from singularity_stack.provision.provisioner import Endpoint, Provisioner, ProvisionError, ProvisionResult
from singularity_stack.securefile import UnsafeFileError, private_dir, read_private, write_private
from singularity_stack.service.settings import SettingsError
from singularity_stack.topology import StackLayout


def _provision(
    admin_dsn: str,
    instances: int,
    credentials_out: Path,
    *,
    rotate: list[str] | None = None,
    public_endpoint: Endpoint | None = None,
    pgmq_method: str | None = None,
    prefix: str = "",
) -> ProvisionResult:
    """Provision, reusing the passwords of an existing credentials file, and (re)write that file."""
    known = creds.known_passwords(creds.load(credentials_out))
    result = Provisioner(
        admin_dsn,
        StackLayout(instances, prefix),
        known_passwords=known,
        rotate=rotate or [],
        public_endpoint=public_endpoint,
        pgmq_method=pgmq_method,  # type: ignore[arg-type]
        report=lambda line: print(f"  {line}", flush=True),
        persist=lambda credentials: creds.save(credentials_out, credentials),
    ).run()
    creds.save(credentials_out, result.credentials)
    return result


def cmd_provision(args: argparse.Namespace) -> int:
    public = Endpoint(args.public_host, args.public_port) if args.public_host else None
    result = _provision(
        args.admin_dsn,
        args.singularity_instances,
        args.credentials_out,
        rotate=args.rotate_password,
        public_endpoint=public,
        pgmq_method=args.pgmq_method,
        prefix=args.prefix,
    )
    print(f"pgmq {result.pgmq.version} ({result.pgmq.method})")
    print(f"{len(result.changes)} change(s); credentials in {args.credentials_out}")
    return 0


def cmd_migrations(args: argparse.Namespace) -> int:
    try:
        applied = applied_migrations(args.database_url)
    except psycopg.Error as error:
        reason = " ".join(str(error).split())  # psycopg's message spans lines
        print(f"error: cannot read the migrations (--database-url): {reason}", file=sys.stderr)
        return 2
    for migration_id in applied:
        print(migration_id)
    if not applied:
        print("(no migrations applied)", file=sys.stderr)
    return 0


def _ui_token(state: Path) -> str:
    """The HITL UI token: $NEXUS_UI_TOKEN, else one generated once and kept in the state directory."""
    return _state_token(state, "NEXUS_UI_TOKEN", "ui-token")


# The bearer tokens of Singularity's task API and CentralCloud's analytics API: (env var, file in the state dir).
API_TOKENS = {
    "singularity": ("SINGULARITY_API_TOKEN", "singularity-api-token"),
    "centralcloud": ("CENTRALCLOUD_API_TOKEN", "centralcloud-api-token"),
}


def _state_token(state: Path, env_var: str, filename: str) -> str:
    """$env_var, else a token generated once and kept in the state directory."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    path = state / filename
    token = (read_private(path) or "").strip()
    if len(token) < 16:  # none yet (or not one Nexus would accept): a new one
        token = secrets.token_urlsafe(24)
        write_private(path, token)
    return token


def cmd_reviewers(args: argparse.Namespace) -> int:
    """Named HITL reviewers in a reviewers file (hashes only): add prints the new token, once."""
    reviewers = ReviewerFile(args.file)
    if args.action == "add":
        token = reviewers.add(args.name)
        print(f"reviewer {args.name!r} added to {args.file}; their token (shown only now, keep it safe):")
        print(token)
    elif args.action == "remove":
        reviewers.remove(args.name)
        print(f"reviewer {args.name!r} removed from {args.file}; their sessions end at their next request")
    else:
        for name in reviewers.names():
            print(name)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from singularity_stack.local.supervisor import Supervisor, plan_services, write_state
    from singularity_stack.postgres.cluster import LocalCluster

    # Not resolved: a symlink planted at the state directory's name must be refused, not followed.
    state = private_dir(args.state_dir.absolute())
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    cluster = None
    admin_dsn = args.admin_dsn
    if not admin_dsn:
        port_file = state / "postgres-port"
        port = int(port_file.read_text()) if port_file.exists() else None
        cluster = LocalCluster(state / "postgres", port=port)
        if cluster.account:  # the server's own account must pass through to its data directory
            private_dir(state, traverse_gid=cluster.account.pw_gid)
        print(
            f"[1/3] starting PostgreSQL {cluster.installation.version} ({cluster.installation.source}) "
            f"in {cluster.datadir} on port {cluster.port}",
            flush=True,
        )
        cluster.start()
        port_file.write_text(str(cluster.port))
        admin_dsn = cluster.dsn()
    supervisor = None
    try:
        credentials_file = state / "credentials.json"
        print("[2/3] provisioning the databases, roles and queues:", flush=True)
        result = _provision(admin_dsn, args.singularity_instances, credentials_file)
        print(f"  pgmq {result.pgmq.version} ({result.pgmq.method}); credentials in {credentials_file} (0600)")
        if args.no_services:
            for name, entry in result.credentials.items():
                print(f"{name:>16}  DATABASE_URL={entry.database_url}")
        else:
            print("[3/3] starting the services:", flush=True)
            token = _ui_token(state)
            api_tokens = {role: _state_token(state, *names) for role, names in API_TOKENS.items()}
            reviewers_file = state / "reviewers.json"
            ReviewerFile(reviewers_file).ensure()
            extra_env = {role: {API_TOKENS[role][0]: value} for role, value in api_tokens.items()}
            services = plan_services(
                result.credentials,
                state,
                instances=args.singularity_instances,
                ui_token=token,
                extra_env=extra_env | {"nexus": {"NEXUS_REVIEWERS_FILE": str(reviewers_file)}},
            )
            supervisor = Supervisor(services, report=lambda line: print(line, flush=True))
            supervisor.start_all()
            nexus = next(s for s in services if s.name == "nexus")
            summary = {
                "services": supervisor.state(),
                "ui": {"url": nexus.url + "/", "token": token, "reviewers_file": str(reviewers_file)},
                "api_tokens": api_tokens,
                "credentials_file": str(credentials_file),
                "logs": str(state / "logs"),
            }
            if args.state_file:
                write_state(args.state_file, summary)
            print(f"\nHITL UI: {nexus.url}/   token: {token}")
            print(
                f"  named reviewers (the shared token stops working once there is one): "
                f"singularity-stack reviewers add NAME --file {reviewers_file}"
            )
            for role, value in api_tokens.items():
                print(f"{role} API token: {value}   (send 'Authorization: Bearer <token>')")
            for service in services:
                print(f"  {service.name:<16} {service.url}")
        if cluster is None and args.no_services:
            return 0
        print(f"logs in {state / 'logs'}; the stack is up; press Ctrl-C to stop", flush=True)
        while not stopped.wait(1.0):
            if supervisor:
                supervisor.watch_once()
                if args.state_file:
                    summary["services"] = supervisor.state()
                    write_state(args.state_file, summary)
    finally:
        if supervisor:
            print("stopping the services", flush=True)
            supervisor.stop_all()
        if cluster:
            print("stopping PostgreSQL", flush=True)
            cluster.stop()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from singularity_stack.service.run import run_service

    run_service(args.service)
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from singularity_operator.config import OperatorConfig, OperatorConfigError
    from singularity_operator.main import run_operator

    namespaces = [] if args.all_namespaces else args.namespace
    if not namespaces and not args.all_namespaces:
        print("error: give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    try:  # the operator's settings, loaded once, here (singularity_operator/config.py lists them)
        config = OperatorConfig.load(liveness_port=args.liveness_port, metrics_port=args.metrics_port)
    except OperatorConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_operator(config, namespaces)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="singularity-stack", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("provision", help="create the databases, roles, queues and schemas (idempotent)")
    p.add_argument("--admin-dsn", required=True, help="a superuser connection URL")
    p.add_argument("--singularity-instances", type=int, default=1, metavar="N")
    p.add_argument(
        "--credentials-out",
        type=Path,
        required=True,
        metavar="FILE",
        help="JSON credentials; its passwords are reused when it exists",
    )
    p.add_argument(
        "--rotate-password", action="append", default=[], metavar="ROLE", help="give ROLE a new password (repeatable)"
    )
    p.add_argument("--public-host", help="host the services use to reach Postgres (default: the admin DSN's)")
    p.add_argument("--public-port", type=int, default=5432)
    p.add_argument("--pgmq-method", choices=["extension", "sql"], help="force how pgmq is installed")
    p.add_argument("--prefix", default="", help="prefix for database and role names (several stacks, one server)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("migrations", help="list the migrations applied to a service database")
    p.add_argument("--database-url", required=True)
    p.set_defaults(func=cmd_migrations)

    p = sub.add_parser("run", help="run one service (settings from the environment: DATABASE_URL, ...)")
    p.add_argument("service", choices=["singularity", "nexus", "genesis", "centralcloud"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("operator", help="run the Kubernetes operator for SingularityStack resources")
    p.add_argument("--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    p.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--liveness-port", type=int, help="default: $OPERATOR_LIVENESS_PORT, else 8080")
    p.add_argument("--metrics-port", type=int, help="default: $OPERATOR_METRICS_PORT, else 9090 (0: none)")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("reviewers", help="manage the HITL UI's named reviewers (tokens stored hashed)")
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "add NAME and print their new token (only this once)"),
        ("remove", "remove NAME: their token and sessions stop working"),
        ("list", "list the reviewers' names"),
    ):
        a = actions.add_parser(action, help=text)
        if action != "list":
            a.add_argument("name", metavar="NAME")
        a.add_argument(
            "--file",
            type=Path,
            default=Path(".local-stack/reviewers.json"),
            help="the reviewers file (default: the one `up` gives Nexus, .local-stack/reviewers.json)",
        )
    p.set_defaults(func=cmd_reviewers)

    p = sub.add_parser("up", help="run the whole stack locally")
    p.add_argument("--singularity-instances", type=int, default=1, metavar="N")
    p.add_argument("--state-dir", type=Path, default=Path(".local-stack"))
    p.add_argument("--admin-dsn", help="use this PostgreSQL instead of starting a local one")
    p.add_argument("--state-file", type=Path, help="write every service's URL and the UI token here once ready")
    p.add_argument("--no-services", action="store_true", help="only PostgreSQL and provisioning")
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except (ProvisionError, UnsafeFileError, RoutingConfigError, ReviewersError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
