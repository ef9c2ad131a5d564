"""Create a stack's databases, roles, pgmq, queues, privileges and schemas: idempotently.

Running it again changes nothing and never changes an existing password; a larger instance
count adds only the new instances, a smaller one drops nothing: the instances above it keep their
databases, roles, reply queues and grants (retired, as the operator's Retain policy keeps them;
`deprovision.drop_instance` removes one), so raising the count again finds them as they were.
Isolation is enforced by PostgreSQL: CONNECT is revoked from PUBLIC on every database, each role
owns its own database and reaches `shared_queue` only through the queue privileges of `privileges.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from singularity_stack.postgres.pgmq_install import Method, PgmqInstall, ensure_pgmq
from singularity_stack.provision import privileges
from singularity_stack.provision.credentials import ServiceCredentials, generate_password, postgres_url
from singularity_stack.provision.errors import ProvisionError as ProvisionError  # re-exported: callers import it here
from singularity_stack.provision.migrations import applied_migrations, migrate, service_kind
from singularity_stack.provision.pgmq_upgrade import ensure_current_pgmq
from singularity_stack.provision.queues import ensure_queues
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)
# Databases migrated at once: connections beside the admin one, well within budget.HEADROOM.
MIGRATION_WORKERS = 4


@dataclass
class ProvisionResult:
    layout: StackLayout
    credentials: dict[str, ServiceCredentials]
    passwords: dict[str, str]
    pgmq: PgmqInstall
    changes: list[str] = field(default_factory=list)
    migrations: dict[str, list[str]] = field(default_factory=dict)  # applied by this run, per logical owner
    # Every migration each database records as applied (its _yoyo_migration), whoever applied it.
    applied: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def endpoint_of(dsn: str) -> Endpoint:
    parts = urlsplit(dsn)
    return Endpoint(parts.hostname or "localhost", parts.port or 5432)


def with_database(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return parts._replace(path="/" + dbname).geturl()


OWNER_MARK = "singularity-stack "


def recorded_owner(conn: psycopg.Connection, layout: StackLayout) -> str | None:
    """The stack recorded on the shared_queue database, if any."""
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (layout.shared_queue_database,),
    ).fetchone()
    comment = (row[0] or "") if row else ""
    return comment[len(OWNER_MARK) :] if comment.startswith(OWNER_MARK) else None


def check_owner(conn: psycopg.Connection, layout: StackLayout, owner: str) -> None:
    """Refuse to touch databases another stack made under the same names."""
    recorded = recorded_owner(conn, layout)
    if recorded is not None and recorded != owner:
        raise ProvisionError(
            f"the databases and roles {layout.prefix}* on this server belong to stack {recorded}, whose names are "
            f"the same as {owner}'s: rename one of the stacks or use another server; nothing was changed"
        )


class Provisioner:
    def __init__(
        self,
        admin_dsn: str,
        layout: StackLayout,
        *,
        known_passwords: Mapping[str, str] | None = None,
        rotate: Iterable[str] = (),
        public_endpoint: Endpoint | None = None,
        pgmq_method: Method | None = None,
        report: Callable[[str], None] | None = None,
        persist: Callable[[dict[str, ServiceCredentials]], None] | None = None,
        owner: str | None = None,
        migrate: bool | Collection[str] = True,
    ) -> None:
        self.admin_dsn = admin_dsn
        self.layout = layout
        self.passwords = dict(known_passwords or {})
        self.rotate = set(rotate)
        # Where the services reach Postgres (e.g. a Kubernetes Service), if not where we do.
        self.admin_endpoint = endpoint_of(admin_dsn)
        self.public_endpoint = public_endpoint or self.admin_endpoint
        self.pgmq_method = pgmq_method
        self.report = report or (lambda line: log.info("%s", line))
        # Called as soon as passwords exist, so a failure in a later step never loses one.
        self.persist = persist
        self.changes: list[str] = []
        # Who the stack is ("<namespace>/<name>"): recorded on its shared_queue database. Two stacks whose
        # prefixes are equal ("team-a"/"x" and "team"/"a-x" both make team_a_x_) must not share databases.
        self.owner = owner
        # Which service databases get this package's migrations: all (`up`, the CLI), none, or only the
        # named logical owners (the operator: new databases; the others are migrated by their image's Job).
        self.migrate = migrate

    def _changed(self, what: str) -> None:
        self.changes.append(what)
        self.report(what)

    # -- roles and databases (autocommit: CREATE DATABASE cannot run in a transaction) ---------------

    def _ensure_role(self, conn: psycopg.Connection, role: str) -> None:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists and role not in self.rotate:
            if role not in self.passwords:
                raise ProvisionError(
                    f"role {role} exists but its password is not known: pass the credentials file that holds it, "
                    f"or set a new one with --rotate-password {role}"
                )
            return
        password = generate_password() if role in self.rotate or role not in self.passwords else self.passwords[role]
        self.passwords[role] = password
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        self._changed(f"{'rotated password of' if exists else 'created'} role {role}")

    def _ensure_database(self, conn: psycopg.Connection, database: str, owner: str) -> None:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(owner)))
            self._changed(f"created database {database}")
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))

    def _plan_new_passwords(self) -> None:
        """A password for every role still to be created, chosen before any is: `persist` can then keep them
        first, and a run that dies between CREATE ROLE and saving the credentials loses no password."""
        roles = [self.layout.role(logical) for logical in self.layout.owners] + [self.layout.analytics_role]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            if self.owner is not None:  # another stack's databases under the same names: say so, write nothing
                check_owner(conn, self.layout, self.owner)
            existing = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,))}
        for role in roles:
            if role in self.passwords:
                continue
            if role in existing and role not in self.rotate:
                raise ProvisionError(
                    f"role {role} exists but its password is not known: pass the credentials file that holds it, "
                    f"or set a new one with --rotate-password {role}"
                )
            self.passwords[role] = generate_password()  # a new role's, or a lost one about to be set anew

    def _roles_and_databases(self) -> None:
        layout = self.layout
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for logical in layout.owners:
                self._ensure_role(conn, layout.role(logical))
            self._ensure_role(conn, layout.analytics_role)
            self._ensure_database(conn, layout.shared_queue_database, layout.role("centralcloud"))
            for logical in layout.owners:
                self._ensure_database(conn, layout.database(logical), layout.role(logical))
            members = [layout.role(r) for r in layout.owners] + [layout.analytics_role]
            conn.execute(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                    sql.Identifier(layout.shared_queue_database), sql.SQL(", ").join(map(sql.Identifier, members))
                )
            )
            if self.owner is not None:  # only now: the roles' passwords were known, so the stack is ours
                conn.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(layout.shared_queue_database), sql.Literal(OWNER_MARK + self.owner)
                    )
                )

    # -- shared_queue: pgmq, queues owned by CentralCloud, privileges --------------------------------

    def _shared_queue(self) -> PgmqInstall:
        layout = self.layout
        with psycopg.connect(with_database(self.admin_dsn, layout.shared_queue_database)) as conn:
            installed = ensure_pgmq(conn, prefer=self.pgmq_method)
            if installed.newly_installed:
                self._changed(f"installed pgmq {installed.version} ({installed.method})")
            else:
                # In the same transaction as the privileges and queues below: all of it lands, or none.
                current = ensure_current_pgmq(conn, layout, installed)
                if current.version != installed.version:
                    self._changed(f"upgraded pgmq {installed.version} -> {current.version} ({installed.method})")
                installed = current
            for statement in privileges.schema_statements(layout):
                conn.execute(statement)
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(layout.role("centralcloud"))))
            for queue in ensure_queues(conn, layout):
                self._changed(f"created queue {queue}")
            conn.execute("RESET ROLE")
            conn.commit()
            return installed

    # -- results -------------------------------------------------------------------------------------

    def _url(self, role: str, database: str, endpoint: Endpoint) -> str:
        return postgres_url(role, self.passwords[role], endpoint.host, endpoint.port, database)

    def credentials(self, endpoint: Endpoint | None = None) -> dict[str, ServiceCredentials]:
        """Each service's URLs, pointing at `endpoint` (default: where the services reach Postgres)."""
        where = endpoint or self.public_endpoint
        layout = self.layout
        result = {}
        for logical in layout.owners:
            role = layout.role(logical)
            result[logical] = ServiceCredentials(
                database_url=self._url(role, layout.database(logical), where),
                shared_queue_url=self._url(role, layout.shared_queue_database, where),
            )
        result["centralcloud"].shared_queue_analytics_url = self._url(
            layout.analytics_role, layout.shared_queue_database, where
        )
        return result

    def _migrates(self, logical: str) -> bool:
        return self.migrate if isinstance(self.migrate, bool) else logical in self.migrate

    def _migrate_one(self, logical: str, database_url: str) -> tuple[list[str] | None, list[str]]:
        """(the migrations applied now, None when this database is not ours to migrate; all it records)."""
        if self._migrates(logical):
            return migrate(service_kind(logical), database_url)
        return None, applied_migrations(database_url)

    def _migrate(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(applied now, applied in all) per logical owner. The databases are independent (each its own role's,
        each migration under yoyo's lock in its own database): a few at a time, on MIGRATION_WORKERS
        connections, within the budget's headroom. Reported in the layout's order, as one at a time would."""
        urls = {logical: creds.database_url for logical, creds in self.credentials(self.admin_endpoint).items()}
        workers = min(MIGRATION_WORKERS, len(urls)) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="migrate") as pool:
            futures = {logical: pool.submit(self._migrate_one, logical, url) for logical, url in urls.items()}
            now, applied = {}, {}
            for logical, future in futures.items():  # a failure is raised after the ones before it are reported
                try:
                    done, recorded = future.result()
                except BaseException:
                    for pending in futures.values():  # those not started yet are not started at all
                        pending.cancel()
                    raise
                if done is not None:
                    if done:
                        self._changed(f"migrated {self.layout.database(logical)}: {', '.join(done)}")
                    now[logical] = done
                applied[logical] = recorded
        return now, applied

    def run(self) -> ProvisionResult:
        self._plan_new_passwords()
        if self.persist:  # before the roles exist: their passwords are never only in this process
            self.persist(self.credentials())
        self._roles_and_databases()
        if self.persist and self.rotate:  # rotated passwords are known only now
            self.persist(self.credentials())
        installed = self._shared_queue()
        migrations, applied = self._migrate()
        return ProvisionResult(
            self.layout, self.credentials(), dict(self.passwords), installed, self.changes, migrations, applied
        )
