"""Finding PostgreSQL server binaries: Debian's packages first, the `pgserver` wheel as a fallback."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from singularity_stack.reachable import Account, CopyFailed, blocked, reachable_copy

BINDIR_ENV = "SINGULARITY_PG_BINDIR"
SERVER_TOOLS = ("postgres", "initdb", "pg_ctl")


class NoPostgresError(RuntimeError):
    """No usable PostgreSQL server binaries were found."""


@dataclass(frozen=True)
class PostgresInstallation:
    """A directory holding `postgres`, `initdb` and `pg_ctl` (plus `pg_config`)."""

    bindir: Path
    source: str
    # Extra shared-library directories, for relocated copies of binaries that find libpq via $ORIGIN.
    library_path: tuple[Path, ...] = ()

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.library_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(str(p) for p in self.library_path)
        return env

    def tool(self, name: str) -> Path:
        return self.bindir / name

    def pg_config(self, option: str) -> Path:
        out = subprocess.run(
            [str(self.tool("pg_config")), f"--{option}"],
            check=True,
            capture_output=True,
            text=True,
            env=self.environment(),
        ).stdout
        return Path(out.strip())

    @cached_property
    def version(self) -> str:
        out = subprocess.run(
            [str(self.tool("postgres")), "--version"],
            check=True,
            capture_output=True,
            text=True,
            env=self.environment(),
        ).stdout
        match = re.search(r"\d+(\.\d+)*", out.split(")", 1)[-1])
        return match.group(0) if match else out.strip()

    @property
    def sharedir(self) -> Path:
        return self.pg_config("sharedir")

    def has_extension(self, name: str) -> bool:
        return (self.sharedir / "extension" / f"{name}.control").exists()


def private_library_dirs(binary: Path) -> tuple[Path, ...]:
    """Directories outside the system's where `binary` finds its shared libraries (per ldd)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    dirs: list[Path] = []
    for line in out.splitlines():
        _, arrow, target = line.partition("=>")
        path = target.split("(")[0].strip() if arrow else ""
        if path.startswith("/") and not path.startswith(("/lib", "/usr/lib")):
            parent = Path(path).parent
            if parent not in dirs:
                dirs.append(parent)
    return tuple(dirs)


def _has_server_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in SERVER_TOOLS)


def _debian_bindirs() -> list[Path]:
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return []
    versions = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
    return [v / "bin" for v in versions]


def _pgserver_bindir() -> Path | None:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def find_installation() -> PostgresInstallation:
    """The server binaries to run: $SINGULARITY_PG_BINDIR, Debian's, PATH's, then the pgserver wheel's."""
    override = os.environ.get(BINDIR_ENV)
    if override:
        if not _has_server_tools(Path(override)):
            raise NoPostgresError(f"{BINDIR_ENV}={override} has no postgres, initdb and pg_ctl")
        return PostgresInstallation(Path(override), "environment")
    for bindir in _debian_bindirs():
        if _has_server_tools(bindir):
            return PostgresInstallation(bindir, "debian")
    on_path = shutil.which("pg_config")
    if on_path:
        bindir = Path(subprocess.run([on_path, "--bindir"], capture_output=True, text=True).stdout.strip())
        if _has_server_tools(bindir):
            return PostgresInstallation(bindir, "path")
    wheel = _pgserver_bindir()
    if wheel and _has_server_tools(wheel):
        return PostgresInstallation(wheel, "pgserver")
    raise NoPostgresError(
        "no PostgreSQL server binaries found: install Debian's postgresql package, "
        "the pgserver wheel, or set " + BINDIR_ENV
    )


def _out_of_reach(installation: PostgresInstallation, account: Account) -> str | None:
    """The first file of `installation` the server's account cannot use, and why; None when it can use all."""
    wanted = [(installation.tool(tool), os.X_OK) for tool in SERVER_TOOLS]
    for directory in (installation.sharedir, installation.pg_config("pkglibdir"), *installation.library_path):
        wanted.append((directory, os.X_OK))
    for path, access in wanted:
        if problem := blocked(path, account, access):
            return f"{path} ({problem})"
    return None


def reachable_by(installation: PostgresInstallation, account: Account) -> PostgresInstallation:
    """`installation`, or a copy of it in a root-owned 0755 directory when `account` cannot reach its files.

    initdb refuses to run as root, so as root the server runs as another account (cluster.py); the `pgserver`
    wheel inside a checkout under a private directory (root's home, 0700) is out of that account's reach.
    The copy keeps the layout around the binaries (PostgreSQL finds its share and lib directories relative
    to them, and the wheel's binaries their libpq via $ORIGIN) and is made once per content (reachable.py).
    Raises NoPostgresError, naming the path in the way and the fix, when no copy can be made.
    """
    problem = _out_of_reach(installation, account)
    if problem is None:
        return installation
    prefix = installation.bindir.resolve().parent
    libraries = {Path(os.path.normpath(p)) for p in installation.library_path}
    libraries |= {Path(os.path.normpath(p)) for p in private_library_dirs(installation.tool("initdb"))}
    libraries = {p for p in libraries if not p.is_relative_to(prefix)}
    sources = [prefix, *sorted(libraries)]
    anchor = Path(os.path.commonpath(sources))
    try:
        copy = reachable_copy(sources, anchor, account, "postgres", follow_symlinks=True)
    except CopyFailed as error:
        raise NoPostgresError(
            f"PostgreSQL runs as {account.describe()}, who cannot reach {problem}, and no copy could be made "
            f"where it can ({error}): install Debian's postgresql package or move the checkout under a "
            "directory others may traverse"
        ) from None
    return PostgresInstallation(
        copy / installation.bindir.resolve().relative_to(anchor),
        f"{installation.source}, copied where {account.name} can reach it",
        tuple(copy / p.relative_to(anchor) for p in sorted(libraries)),
    )
