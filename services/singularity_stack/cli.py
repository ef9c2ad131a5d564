"""The `singularity-stack` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from pathlib import Path

import psycopg

from singularity_stack.nexus.reviewers import ReviewerFile, ReviewersError
from singularity_stack.nexus.routing_config import RoutingConfigError
from singularity_stack.provision import backup, deprovision
from singularity_stack.provision import credentials as creds
from singularity_stack.provision.migrations import applied_migrations, apply_migrations, service_kind
from singularity_stack.provision.provisioner import Endpoint, Provisioner, ProvisionError, ProvisionResult
from singularity_stack.securefile import UnsafeFileError, read_private, write_private
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
    drop_retired: bool = False,
) -> ProvisionResult:
    """Provision, reusing the passwords of an existing credentials file, and (re)write that file.

    Instances above `instances` are retired, not dropped: their entries move to the file's "retired"
    section (nothing starts them) and a larger count later reuses their passwords. With `drop_retired`
    their databases, roles and reply queues are dropped instead, and their entries with them."""
    previous = creds.read(credentials_out)

    def save(credentials: dict[str, creds.ServiceCredentials]) -> None:
        creds.save(credentials_out, credentials, creds.retire(previous, credentials))

    result = Provisioner(
        admin_dsn,
        StackLayout(instances, prefix),
        known_passwords=creds.known_passwords(previous.everything()),
        rotate=rotate or [],
        public_endpoint=public_endpoint,
        pgmq_method=pgmq_method,  # type: ignore[arg-type]
        report=lambda line: print(f"  {line}", flush=True),
        persist=save,
    ).run()
    save(result.credentials)
    if drop_retired:
        for dropped in deprovision.drop_retired(admin_dsn, result.layout):
            print(f"  dropped {dropped}", flush=True)
        creds.save(credentials_out, result.credentials)  # no retired instance left
    elif retired := creds.retire(previous, result.credentials):
        print(f"  retired, kept and not started: {', '.join(retired)}", flush=True)
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
        drop_retired=args.drop_retired,
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


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply this image's migrations for one service to its database, as the role in the URL (its own)."""
    url = args.database_url or os.environ.get("DATABASE_URL", "")
    if not url:
        print("error: migrate needs --database-url or DATABASE_URL (the service's own database)", file=sys.stderr)
        return 2
    try:
        done = apply_migrations(service_kind(args.service), url)
        applied = applied_migrations(url)
    except psycopg.Error as error:
        reason = " ".join(str(error).split())
        line = f"error: migrating {args.service}: {reason} (the failing migration was rolled back)"
        print(line, file=sys.stderr)
        _termination_message(args.termination_log, line)
        return 2
    for migration_id in done:
        print(f"applied {migration_id}")
    last = applied[-1] if applied else "(none)"
    print(f"{args.service}: {len(done)} applied now, last applied {last}")
    _termination_message(args.termination_log, f"last applied {last}")
    return 0


def _termination_message(path: Path | None, line: str) -> None:
    """The outcome for whoever started the command (a Kubernetes Job reads a container's termination message)."""
    if path is not None:
        with contextlib.suppress(OSError):  # never hides the outcome the exit status already says
            path.write_text(line + "\n")


def _pg_tools() -> Path | None:
    """The directory of pg_dump, pg_restore and psql: the server's installation's, else PATH's (None)."""
    from singularity_stack.postgres.installation import NoPostgresError, find_installation

    try:
        bindir = find_installation().bindir
    except NoPostgresError:
        return None
    return bindir if (bindir / "pg_dump").exists() else None


def cmd_backup(args: argparse.Namespace) -> int:
    """Dump a stack's roles and databases into a new directory of --backup-dir (the CronJob's script)."""
    env = {
        **backup.libpq_environment(args.admin_dsn),
        **backup.dump_environment(
            StackLayout(args.singularity_instances, args.prefix), str(args.backup_dir), args.retention
        ),
    }
    report = backup.run_script(backup.dump_script(), env, _pg_tools()).report
    print(
        f"backup {report['backup']}: {report['databases']} databases, {report['sizeBytes']} bytes in "
        f"{args.backup_dir}; {report['removed']} older backup(s) removed (retention {args.retention})"
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a backup onto a server without the stack, give its roles passwords (kept in FILE first), provision."""
    name, layout = backup.backup_layout(args.backup_dir, args.backup)
    env = {**backup.libpq_environment(args.admin_dsn), "BACKUP_ROOT": str(args.backup_dir), "RESTORE_BACKUP": name}
    report = backup.run_script(backup.restore_script(), env, _pg_tools()).report
    known = creds.known_passwords(creds.read(args.credentials_out).everything())
    passwords = {
        role: known.get(role) or creds.generate_password() for role in backup.passwordless_roles(args.admin_dsn, layout)
    }
    public = Endpoint(args.public_host, args.public_port) if args.public_host else None
    planned = Provisioner(args.admin_dsn, layout, known_passwords={**known, **passwords}, public_endpoint=public)
    creds.save(args.credentials_out, planned.credentials())  # before any role has it: no password is ever lost
    backup.set_passwords(args.admin_dsn, passwords)
    _provision(args.admin_dsn, layout.instances, args.credentials_out, public_endpoint=public, prefix=layout.prefix)
    print(f"restored backup {name} ({report['databases']} databases); credentials in {args.credentials_out}")
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
    from singularity_stack.local.up import run_up

    return run_up(args)


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
    p.add_argument(
        "--drop-retired",
        action="store_true",
        help="drop the instances above N (databases, roles, reply queues) instead of keeping them retired",
    )
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("migrations", help="list the migrations applied to a service database")
    p.add_argument("--database-url", required=True)
    p.set_defaults(func=cmd_migrations)

    p = sub.add_parser("migrate", help="apply this image's migrations to one service's database, as its role")
    p.add_argument("service", choices=["singularity", "nexus", "genesis", "centralcloud"])
    p.add_argument("--database-url", help="the service's own database URL (default: $DATABASE_URL)")
    p.add_argument("--termination-log", type=Path, help="also write the outcome (last applied id, or the error) here")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("backup", help="dump a stack's roles and databases into a new directory of --backup-dir")
    p.add_argument("--admin-dsn", required=True, help="a superuser connection URL")
    p.add_argument("--singularity-instances", type=int, default=1, metavar="N")
    p.add_argument("--prefix", default="", help="the stack's database and role name prefix")
    p.add_argument("--backup-dir", type=Path, required=True, metavar="DIR", help="one directory per backup in it")
    p.add_argument("--retention", type=int, default=7, metavar="K", help="keep the K newest backups (default 7)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="restore a backup onto a server without the stack, then provision it")
    p.add_argument("--admin-dsn", required=True, help="a superuser connection URL")
    p.add_argument("--backup-dir", type=Path, required=True, metavar="DIR")
    p.add_argument("--backup", default="latest", metavar="NAME", help="a backup's name (YYYYMMDDTHHMMSSZ) or latest")
    p.add_argument(
        "--credentials-out", type=Path, required=True, metavar="FILE", help="the restored stack's credentials"
    )
    p.add_argument("--public-host", help="host the services use to reach Postgres (default: the admin DSN's)")
    p.add_argument("--public-port", type=int, default=5432)
    p.set_defaults(func=cmd_restore)

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
    for service in ("nexus", "genesis"):
        p.add_argument(
            f"--{service}-workers",
            type=_workers,
            default=1,
            metavar="N",
            help=f"{service} processes sharing its queues (default 1; at most {MAX_WORKERS})",
        )
    p.add_argument(
        "--messaging",
        choices=("pgmq", "dual", "cutover"),
        default="pgmq",
        help="the migration from NATS: pgmq only (default), dual operation (NATS too), or cutover",
    )
    p.add_argument("--nats-url", metavar="URL", help="the platform's nats-server, for --messaging dual or cutover")
    p.add_argument("--state-dir", type=Path, default=Path(".local-stack"))
    p.add_argument("--admin-dsn", help="use this PostgreSQL instead of starting a local one")
    p.add_argument("--state-file", type=Path, help="write every service's URL and the UI token here once ready")
    p.add_argument("--no-services", action="store_true", help="only PostgreSQL and provisioning")
    p.add_argument(
        "--port-base",
        type=int,
        metavar="N",
        help="PostgreSQL on N, the services on N+1, N+2, ... (default: the last run's, kept in the state dir)",
    )
    p.set_defaults(func=cmd_up)
    return parser


MAX_WORKERS = 16


def _workers(text: str) -> int:
    """An argparse type: 1..MAX_WORKERS, refused in one line otherwise."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes from 1 to {MAX_WORKERS}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except (ProvisionError, UnsafeFileError, RoutingConfigError, ReviewersError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as error:  # e.g. an admin DSN that does not answer
        reason = " ".join(str(error).split())  # psycopg's message spans lines
        print(f"error: cannot reach PostgreSQL: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
