"""Files holding secrets (credentials, `up`'s state file, the UI token) and `up`'s private directories:
whatever another local account planted at a name the code uses is replaced or refused, never written or
read through."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from singularity_stack.cli import _ui_token
from singularity_stack.local.supervisor import write_state
from singularity_stack.provision import credentials as creds
from singularity_stack.securefile import UnsafeFileError

CLI = [sys.executable, "-m", "singularity_stack.cli"]
SECRET = "s3cret-pa55word-value"
OTHER_UID = 65534  # nobody: "another account" when the tests run as root
UNREACHABLE_DSN = "postgresql://nobody@127.0.0.1:1/none"


def write_credentials(path: Path) -> None:
    url = f"postgresql://nexus:{SECRET}@127.0.0.1:5432/nexus"
    creds.save(path, {"nexus": creds.ServiceCredentials(database_url=url, shared_queue_url=url)})


def write_state_file(path: Path) -> None:
    write_state(path, {"ui": {"url": "http://127.0.0.1:1/", "token": SECRET}})


WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "credentials": ("credentials.json", write_credentials),
    "state": ("state.json", write_state_file),
}


def plant_file(path: Path, content: str, mode: int = 0o644) -> None:
    """A regular file that, where we can arrange it, belongs to another account."""
    path.write_text(content)
    path.chmod(mode)
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)


def snapshot(path: Path) -> tuple[str, int, int]:
    info = path.lstat()
    return path.read_text(), stat.S_IMODE(info.st_mode), info.st_uid


def assert_private_secret(path: Path) -> None:
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode), f"{path} is not a regular file"
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert SECRET in path.read_text()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """The directory the code writes in, and an 'outside' one holding the planted links' targets."""
    (tmp_path / "work").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "work", tmp_path / "outside"


@pytest.fixture
def fifo_watchdog() -> Iterator[Callable[[list[Path]], list[bool]]]:
    """Arm a timer that, should the code block on a planted FIFO, opens its other end so the test ends."""
    timers: list[threading.Timer] = []

    def arm(fifos: list[Path]) -> list[bool]:
        fired: list[bool] = []

        def unblock() -> None:
            fired.append(True)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # keep opening both ends: the blocked open needs the other one
                for fifo in fifos:
                    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
                        with contextlib.suppress(OSError):
                            os.close(os.open(fifo, flags))
                time.sleep(0.05)

        timer = threading.Timer(5.0, unblock)
        timer.start()
        timers.append(timer)
        return fired

    yield arm
    for timer in timers:
        timer.cancel()


@pytest.mark.parametrize("writer", WRITERS)
def test_planted_symlinks_are_replaced_not_written_through(dirs: tuple[Path, Path], writer: str) -> None:
    work, outside = dirs
    name, write = WRITERS[writer]
    target = outside / "victim"
    plant_file(target, "the victim's content\n")
    before = snapshot(target)
    (work / name).symlink_to(target)
    (work / f"{name}.tmp").symlink_to(outside / "created-through-the-link")  # the old fixed temp name

    write(work / name)

    assert snapshot(target) == before
    assert not (outside / "created-through-the-link").exists()
    assert_private_secret(work / name)
    # No temp file left behind, and the secret nowhere but in the file itself.
    assert sorted(p.name for p in work.iterdir()) == sorted([name, f"{name}.tmp"])
    assert (work / f"{name}.tmp").is_symlink()


@pytest.mark.parametrize("writer", WRITERS)
def test_another_accounts_file_is_replaced_by_one_of_ours(dirs: tuple[Path, Path], writer: str) -> None:
    work, _ = dirs
    name, write = WRITERS[writer]
    plant_file(work / name, "planted final\n")
    plant_file(work / f"{name}.tmp", "planted temp\n")
    with (work / name).open() as planted:  # the planted inode, to see it is never written
        write(work / name)
        assert planted.read() == "planted final\n"
    assert_private_secret(work / name)
    assert snapshot(work / f"{name}.tmp")[0] == "planted temp\n"


@pytest.mark.parametrize("writer", WRITERS)
def test_planted_fifos_do_not_hang_the_writer(
    dirs: tuple[Path, Path], writer: str, fifo_watchdog: Callable[[list[Path]], list[bool]]
) -> None:
    work, _ = dirs
    name, write = WRITERS[writer]
    fifos = [work / name, work / f"{name}.tmp"]
    for fifo in fifos:
        os.mkfifo(fifo, 0o666)
    fired = fifo_watchdog(fifos)
    write(work / name)
    assert not fired, "the writer blocked on a planted FIFO"
    assert_private_secret(work / name)


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEXUS_UI_TOKEN", raising=False)


@pytest.mark.usefixtures("no_token_env")
@pytest.mark.parametrize(
    ("planted", "reason"),
    [
        ("symlink", "symbolic link"),
        ("dangling-symlink", "symbolic link"),  # would create the file the link names
        ("foreign", f"owned by uid {OTHER_UID}" if os.geteuid() == 0 else "lets other accounts read it"),
        ("readable", "lets other accounts read it"),
        ("fifo", "not a regular file"),
    ],
)
def test_ui_token_is_never_read_through_a_planted_name(
    dirs: tuple[Path, Path], planted: str, reason: str, fifo_watchdog: Callable[[list[Path]], list[bool]]
) -> None:
    work, outside = dirs
    path = work / "ui-token"
    attacker_token = "attacker-chosen-token-0123456789"
    if planted == "symlink":
        plant_file(outside / "token", attacker_token)
        path.symlink_to(outside / "token")
    elif planted == "dangling-symlink":
        path.symlink_to(outside / "created-through-the-link")
    elif planted == "foreign":
        plant_file(path, attacker_token, mode=0o600 if os.geteuid() == 0 else 0o644)
    elif planted == "readable":
        path.write_text(attacker_token)
        path.chmod(0o644)
    else:
        os.mkfifo(path, 0o666)
    fired = fifo_watchdog([path])
    with pytest.raises(UnsafeFileError, match=reason):
        _ui_token(work)
    assert not fired, "reading the token blocked on a planted FIFO"
    if planted == "dangling-symlink":
        assert list(outside.iterdir()) == []
    elif planted != "fifo":
        assert path.read_text() == attacker_token  # refused, not overwritten


def test_provision_refuses_a_symlinked_credentials_file_in_one_line(dirs: tuple[Path, Path]) -> None:
    work, outside = dirs
    plant_file(outside / "victim.json", json.dumps({"nexus": {"database_url": "x", "shared_queue_url": "y"}}))
    (work / "credentials.json").symlink_to(outside / "victim.json")
    result = subprocess.run(
        [*CLI, "provision", "--admin-dsn", UNREACHABLE_DSN, "--credentials-out", str(work / "credentials.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: refusing to read {work / 'credentials.json'}: it is a symbolic link"
    ]


@pytest.mark.parametrize("planted", ["symlink", "foreign"])
def test_up_refuses_a_planted_state_directory_in_one_line(dirs: tuple[Path, Path], planted: str) -> None:
    work, outside = dirs
    state = work / "stack"
    if planted == "symlink":
        state.symlink_to(outside, target_is_directory=True)
        reason = "it is a symbolic link"
    else:
        state.mkdir()
        if os.geteuid() == 0:
            os.chown(state, OTHER_UID, OTHER_UID)
            reason = f"owned by uid {OTHER_UID}"
        else:
            state.chmod(0o777)
            reason = "lets other accounts write to it"
    result = subprocess.run(
        [*CLI, "up", "--no-services", "--admin-dsn", UNREACHABLE_DSN, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: refusing to use {state}: {reason}"), line
    assert list(outside.iterdir()) == []
