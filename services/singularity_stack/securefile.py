"""Files and directories that hold secrets: written, read and created so another local account cannot
redirect, pre-plant or read them.

A secret file is written under a fresh random name (`mkstemp`: O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600) in
its own directory and renamed over the final name, so whatever sits at that name (a symlink, a FIFO,
another account's file) is replaced, never written through. It is read back with O_NOFOLLOW and only
when it is a regular file of ours that no other account can read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

MAX_SECRET_FILE_BYTES = 1 << 20


class UnsafeFileError(Exception):
    """A path that is not safe to keep secrets in (a symlink, another account's file, readable by others...)."""


def write_private(path: Path, data: str | bytes) -> None:
    """Atomically replace `path` with a new file holding `data`, readable and writable by its owner only."""
    path = Path(path)
    content = data.encode() if isinstance(data, str) else data
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # rename(2) replaces the name itself: a symlink there is not followed
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise UnsafeFileError(f"cannot write {path}: {error.strerror or error}") from error
    _fsync_dir(path.parent)


def read_private(path: Path) -> str | None:
    """The text of a secret file we wrote, or None when there is none; anything else at `path` is refused."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO planted here returns at once (and is then refused) instead of hanging.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeFileError(f"refusing to read {path}: it is a symbolic link") from error
        raise UnsafeFileError(f"cannot read {path}: {error.strerror or error}") from error
    with os.fdopen(fd, "rb") as handle:
        _check_private(path, os.fstat(fd), is_dir=False)
        content = handle.read(MAX_SECRET_FILE_BYTES + 1)
    if len(content) > MAX_SECRET_FILE_BYTES:
        raise UnsafeFileError(f"refusing to read {path}: larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        return content.decode()
    except UnicodeDecodeError as error:
        raise UnsafeFileError(f"refusing to read {path}: not UTF-8 text") from error


def private_dir(path: Path, *, traverse_gid: int | None = None) -> Path:
    """Create `path` (mode 0700) or check an existing one is a real directory of ours, and make it private.

    `traverse_gid` lets that group pass through (0710) without listing it: PostgreSQL, run as its own
    account, reaches its data directory inside the state directory that way.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        # With O_DIRECTORY, Linux reports a symlink to a directory as ENOTDIR: lstat says which it is.
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            reason = "it is a symbolic link" if path.is_symlink() else "it is not a directory"
        else:
            reason = error.strerror or str(error)
        raise UnsafeFileError(f"refusing to use {path}: {reason}") from error
    try:
        _check_private(path, os.fstat(fd), is_dir=True)
        if traverse_gid is not None:
            os.fchown(fd, -1, traverse_gid)
        os.fchmod(fd, 0o700 if traverse_gid is None else 0o710)
    finally:
        os.close(fd)
    return path


def _check_private(path: Path, info: os.stat_result, *, is_dir: bool) -> None:
    kind = "directory" if is_dir else "regular file"
    if not (stat.S_ISDIR(info.st_mode) if is_dir else stat.S_ISREG(info.st_mode)):
        raise UnsafeFileError(f"refusing to use {path}: not a {kind}")
    if info.st_uid != os.geteuid():
        raise UnsafeFileError(f"refusing to use {path}: owned by uid {info.st_uid} (we are uid {os.geteuid()})")
    # A directory others may write to lets them plant names in it; a file others may read is already leaked.
    loose = info.st_mode & (0o022 if is_dir else 0o077)
    if loose:
        raise UnsafeFileError(
            f"refusing to use {path}: mode {stat.S_IMODE(info.st_mode):04o} lets other accounts "
            + ("write to it" if is_dir else "read it"),
        )


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable: a crash must not leave the old file (e.g. passwords the server no longer has)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
