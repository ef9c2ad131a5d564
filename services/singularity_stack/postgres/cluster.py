"""A PostgreSQL cluster on this machine, run with initdb + pg_ctl: for tests and the local stack.

PostgreSQL refuses to run as root, so when we are root the cluster runs as the
`postgres` system user (Debian's package creates it) or `nobody`.
"""

from __future__ import annotations

import os
import pwd
import random
import secrets
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote

import psycopg

from singularity_stack.postgres.installation import PostgresInstallation, find_installation, reachable_by
from singularity_stack.reachable import Account, blocked
from singularity_stack.securefile import write_private

SUPERUSER = "postgres"


class ClusterError(RuntimeError):
    """initdb, pg_ctl or the server failed; the message carries its output and log tail."""


_LOWEST_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server that binds it later.

    Taken below the kernel's ephemeral range where there is room: any outgoing connection may get an
    ephemeral port as its local port, and a server started later could then not bind it. A port is never
    handed out twice by one process.
    """
    top = _ephemeral_range_start()
    for _ in range(100 if top > _LOWEST_PORT + 1000 else 0):
        port = random.randrange(_LOWEST_PORT, top)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterError("running as root and neither a 'postgres' nor a 'nobody' account exists")


def server_account() -> pwd.struct_passwd | None:
    """The account a LocalCluster's server runs as when it is not ours (we are root), else None."""
    return _run_as_user()


def admin_dsn(host: str, port: int, password: str, dbname: str = "postgres", user: str = SUPERUSER) -> str:
    return f"postgresql://{quote(user)}:{quote(password, safe='')}@{host}:{port}/{dbname}"


class LocalCluster:
    """One cluster in `datadir`; `start()` creates it on first use. Usable as a context manager."""

    def __init__(
        self,
        datadir: Path,
        *,
        port: int | None = None,
        installation: PostgresInstallation | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.datadir = Path(datadir)
        self._account = _run_as_user()
        self.installation = installation or find_installation()
        if self._account:  # the server's account must reach the binaries, or gets a copy it can reach
            self.installation = reachable_by(self.installation, self._reach_account)
        self.port = port or free_port()
        self.settings = {"max_connections": "300", **(settings or {})}
        self.host = "127.0.0.1"

    @property
    def _reach_account(self) -> Account:
        assert self._account is not None
        return Account(self._account.pw_uid, self._account.pw_gid, self._account.pw_name)

    @property
    def account(self) -> pwd.struct_passwd | None:
        """The account the server runs as, when it is not ours (we are root)."""
        return self._account

    # -- paths and credentials -------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.datadir / "data"

    @property
    def logfile(self) -> Path:
        return self.datadir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.datadir / "superuser-password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def dsn(self, dbname: str = "postgres") -> str:
        return admin_dsn(self.host, self.port, self.password, dbname)

    # -- lifecycle --------------------------------------------------------------------------------

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        user = self._account.pw_uid if self._account else None
        group = self._account.pw_gid if self._account else None
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            user=user,
            group=group,
            cwd="/",
            env=self.installation.environment(),
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{Path(args[0]).name} failed ({result.returncode}): {result.stdout}{result.stderr}"
                f"\n--- log tail ---\n{self.log_tail()}"
            )
        return result

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _give_to_account(self, path: Path) -> None:
        if self._account:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialized:
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._account and (problem := blocked(self.datadir.parent, self._reach_account, os.X_OK)):
            raise ClusterError(
                f"PostgreSQL runs as {self._reach_account.describe()}, who cannot reach {self.datadir} ({problem}): "
                "put the data directory under a directory others may traverse"
            )
        self.datadir.chmod(0o700)
        self._give_to_account(self.datadir)
        # The data directory is the server account's: nothing it planted there is written through.
        write_private(self.password_file, secrets.token_urlsafe(24) + "\n")
        self._give_to_account(self.password_file)
        self._run(
            [
                str(self.installation.tool("initdb")),
                "--pgdata",
                str(self.pgdata),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(self.password_file),
                "--auth-local",
                "scram-sha-256",
                "--auth-host",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-instructions",
            ]
        )

    def _fixed_settings(self) -> dict[str, str]:
        return {"port": str(self.port), "listen_addresses": self.host, "unix_socket_directories": str(self.datadir)}

    def _options(self) -> str:
        settings = {**self.settings, **self._fixed_settings()}
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    @property
    def running(self) -> bool:
        result = subprocess.run(
            [str(self.installation.tool("pg_ctl")), "status", "--pgdata", str(self.pgdata)],
            capture_output=True,
            user=self._account.pw_uid if self._account else None,
            group=self._account.pw_gid if self._account else None,  # the group that may enter `up`'s state dir
            env=self.installation.environment(),
        )
        return result.returncode == 0

    def server_command(self) -> list[str]:
        """The postmaster in the foreground (for a supervisor that runs it as its child; see `start`)."""
        self.init()
        command = [str(self.installation.tool("postgres")), "-D", str(self.pgdata)]
        for key, value in {**self.settings, **self._fixed_settings()}.items():
            command += ["-c", f"{key}={value}"]
        return command

    def open_log(self) -> IO[bytes]:
        """The server log, for appending; the server account's file when the server runs as that account."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.logfile, flags, 0o600)
        if self._account:
            os.fchown(fd, self._account.pw_uid, self._account.pw_gid)
        return os.fdopen(fd, "ab")

    def accepts_connections(self, timeout: float = 1.0) -> bool:
        """Whether the server answers a superuser connection now."""
        try:
            with psycopg.connect(self.dsn(), connect_timeout=max(1, round(timeout))) as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, OSError):
            return False

    def start(self) -> LocalCluster:
        self.init()
        if not self.running:
            self._run(
                [
                    str(self.installation.tool("pg_ctl")),
                    "start",
                    "--wait",
                    "--timeout",
                    "60",
                    "--pgdata",
                    str(self.pgdata),
                    "--log",
                    str(self.logfile),
                    "--options",
                    self._options(),
                ]
            )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode "immediate" simulates a crash (no shutdown checkpoint)."""
        if self.initialized and self.running:
            self._run(
                [str(self.installation.tool("pg_ctl")), "stop", "--wait", "--mode", mode, "--pgdata", str(self.pgdata)]
            )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
