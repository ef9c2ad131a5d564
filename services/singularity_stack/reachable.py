"""Whether another account can reach a file, and a place to put copies of files it cannot.

A service running as root hands work to an unprivileged account (Genesis's jobs run as nobody, PostgreSQL
as `postgres`). A checkout under a private directory (root's home is mode 0700) holds files that account
cannot reach; these helpers say exactly which directory is in the way and copy what is needed into a
root-owned 0755 directory it can reach.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Where copies go: a persistent, root-owned cache first (reused across restarts, one copy per content),
# the temporary directory second. Both must themselves be reachable by the account.
CACHE_ROOTS = (
    Path("/var/cache/singularity-stack/reachable"),
    Path(tempfile.gettempdir()) / "singularity-stack-reachable",
)


class CopyFailed(OSError):
    """No place the account can reach would hold a copy."""


@dataclass(frozen=True)
class Account:
    """An account other than ours that must reach files: its ids and a name to show."""

    uid: int
    gid: int
    name: str

    @classmethod
    def of_uid(cls, uid: int, gid: int) -> Account:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        return cls(uid, gid, name)

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid})" if not self.name.startswith("uid ") else self.name

    def may(self, info: os.stat_result, want: int) -> bool:
        """Whether the mode bits grant `want` (os.R_OK/W_OK/X_OK bits) to this account (ACLs are not read)."""
        if self.uid == 0:
            return True
        if info.st_uid == self.uid:
            shift = 6
        elif info.st_gid == self.gid:
            shift = 3
        else:
            shift = 0
        return (info.st_mode >> shift) & want == want


def blocked(path: Path, account: Account, want: int = os.R_OK) -> str | None:
    """Why `account` cannot reach `path` with `want` access, naming the directory in the way; None when it can.

    Every directory on the way needs search (x) permission, `path` itself `want`: along the path as given
    and along the one its symbolic links lead to (stat follows a link, so both are checked).
    """
    given = Path(os.path.abspath(path))
    for chain in dict.fromkeys((given, Path(os.path.realpath(given)))):
        problem = _blocked_along(chain, account, want)
        if problem:
            return problem
    return None


def _blocked_along(path: Path, account: Account, want: int) -> str | None:
    for step in [*reversed(path.parents), path]:
        try:
            info = os.stat(step)
        except OSError as error:
            return f"{step}: {error.strerror}"
        if not account.may(info, os.X_OK if step != path else want):
            return f"{step} is mode {stat.S_IMODE(info.st_mode):04o}, owner {_owner(info.st_uid)}"
    return None


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def usable_root(root: Path, account: Account) -> bool:
    """Make `root` (mode 0755, ours) or check an existing one is a real directory of ours nobody else may change."""
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o755, parents=True)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return False  # a symlink, or somebody else's: never write through it
    os.chmod(root, 0o755)
    return blocked(root, account, os.X_OK) is None


def reachable_copy(
    sources: Iterable[Path], anchor: Path, account: Account, label: str, *, follow_symlinks: bool = False
) -> Path:
    """Copies of the trees or files `sources` (each inside `anchor`, kept at the same place relative to it)
    in a root-owned 0755 directory `account` can reach; returns the copy of `anchor`.

    Content-addressed (name, size and mtime of every file): the same sources reuse one copy across
    restarts and processes. A copy appears only once complete (built beside it, then renamed).
    `follow_symlinks` copies what links point to (they may point back into the private directory).
    """
    sources = [Path(s) for s in sources]
    digest = hashlib.sha256()
    for source in sources:
        for file in sorted(_files(source)):
            info = os.stat(file) if os.path.exists(file) else os.lstat(file)
            digest.update(f"{file.relative_to(anchor)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    name = f"{label}-{digest.hexdigest()[:16]}"
    errors: list[str] = []
    for root in CACHE_ROOTS:
        try:
            if not usable_root(root, account):
                errors.append(f"{root}: not a root-owned directory {account.describe()} can reach")
                continue
            target = root / name
            if not target.is_dir():
                _build(sources, anchor, root, target, follow_symlinks)
            return target
        except OSError as error:
            errors.append(f"{root}: {error.strerror or error}")
    raise CopyFailed("; ".join(errors))


def _files(source: Path) -> list[Path]:
    if not source.is_dir():
        return [source]
    return [Path(d) / f for d, _, names in os.walk(source, followlinks=True) for f in names]


def _build(sources: list[Path], anchor: Path, root: Path, target: Path, follow_symlinks: bool) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        for source in sources:
            dest = staging / source.relative_to(anchor)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, symlinks=not follow_symlinks)
            else:
                shutil.copy2(source, dest)
        for directory, dirs, files in os.walk(staging):
            for entry in [directory, *(os.path.join(directory, d) for d in dirs)]:
                os.chmod(entry, 0o755)
            for file in files:
                path = os.path.join(directory, file)
                if not os.path.islink(path):
                    mode = stat.S_IMODE(os.lstat(path).st_mode)
                    # Readable by all, executable by all where it was executable; writable only by us.
                    os.chmod(path, 0o755 if mode & 0o111 else 0o644)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # another process finished the same copy first: use theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
