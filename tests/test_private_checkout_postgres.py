"""A checkout under a private directory (root's home, mode 0700), PostgreSQL's side: as root the server runs
as its own account (initdb refuses root), which cannot reach the `pgserver` wheel's binaries in the checkout's
venv nor a data directory under it. The cluster must still come up (from a copy it can reach), or fail with
one line naming the path and the fix; `up` with its state directory in such a checkout must run.

The private layout is real: a root-owned 0700 directory holding a venv-like tree with the wheel's files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from test_cli_up import start, stop

from singularity_stack import reachable
from singularity_stack.local import up
from singularity_stack.postgres import installation as inst
from singularity_stack.postgres.cluster import ClusterError, LocalCluster
from singularity_stack.postgres.pgmq_install import ensure_pgmq, with_pgmq_extension
from singularity_stack_testing.postgres import FAST_SETTINGS

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="NEEDS ROOT: only as root does PostgreSQL run as another account, the case a private checkout "
    "breaks; CI runs as root",
)


def private(path: Path) -> Path:
    """`path` as a root-owned 0700 directory, like /root."""
    path.mkdir(mode=0o700)
    os.chown(path, 0, 0)
    path.chmod(0o700)
    return path


@pytest.fixture(scope="module")
def private_wheel() -> Iterator[tuple[Path, inst.PostgresInstallation]]:
    """The pgserver wheel's files (server and libpq) in <private>/checkout/.venv/.../site-packages."""
    wheel = inst._pgserver_bindir()
    if wheel is None or not wheel.is_dir():
        pytest.skip("MISSING PACKAGE: the pgserver wheel is not installed — pip install -e '.[test]'")
    site = wheel.resolve().parent.parent.parent
    top = Path(tempfile.mkdtemp(prefix="singularity-test-"))
    top.chmod(0o755)
    home = private(top / "home")
    copied = home / "checkout" / ".venv" / "lib" / "python3.11" / "site-packages"
    copied.mkdir(parents=True)
    for directory in (home / "checkout", *[p for p in copied.parents if p.is_relative_to(home / "checkout")]):
        directory.chmod(0o755)  # only the private parent is in the way, as in /root/<checkout>
    shutil.copytree(site / "pgserver" / "pginstall", copied / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(site / "pgserver.libs", copied / "pgserver.libs", symlinks=True)
    yield home, inst.PostgresInstallation(copied / "pgserver" / "pginstall" / "bin", "pgserver")
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def copies(open_tmp: Path, monkeypatch) -> Path:
    root = open_tmp / "reachable"
    monkeypatch.setattr(reachable, "CACHE_ROOTS", (root,))
    return root


def test_a_cluster_from_the_wheel_under_a_private_directory_runs_from_a_copy(private_wheel, copies, open_tmp):
    _, wheel = private_wheel
    cluster = LocalCluster(open_tmp / "c", installation=wheel, settings=FAST_SETTINGS)
    assert cluster.installation.source == "pgserver, copied where postgres can reach it"
    assert cluster.installation.bindir.is_relative_to(copies)
    with cluster, psycopg.connect(cluster.dsn()) as conn:
        assert ensure_pgmq(conn).method == "sql"
        assert conn.execute("SHOW server_version").fetchone()[0].startswith("16.")


def test_the_wheel_with_the_pgmq_extension_under_a_private_directory_runs_too(private_wheel, copies, open_tmp):
    _, wheel = private_wheel
    with_extension = with_pgmq_extension(wheel, open_tmp / "pg")  # links back into the private directory
    cluster = LocalCluster(open_tmp / "c", installation=with_extension, settings=FAST_SETTINGS)
    assert cluster.installation.bindir.is_relative_to(copies)
    with cluster, psycopg.connect(cluster.dsn()) as conn:
        assert ensure_pgmq(conn).method == "extension"


def test_no_copy_possible_is_one_line_naming_the_path_and_the_fix(private_wheel, open_tmp, monkeypatch):
    home, wheel = private_wheel
    monkeypatch.setattr(reachable, "CACHE_ROOTS", (home / "cache",))
    with pytest.raises(inst.NoPostgresError) as raised:
        LocalCluster(open_tmp / "c", installation=wheel)
    message = str(raised.value)
    assert message.startswith("PostgreSQL runs as postgres (uid "), message
    assert f"who cannot reach {wheel.tool('postgres')} ({home} is mode 0700, owner root)" in message, message
    assert (
        message.endswith(
            "install Debian's postgresql package or move the checkout under a directory others may traverse"
        )
        and "\n" not in message
    )


def test_a_data_directory_under_a_private_directory_is_one_line_naming_it(open_tmp):
    home = private(open_tmp / "home")
    cluster = LocalCluster(home / "data")
    with pytest.raises(ClusterError) as raised:
        cluster.init()
    assert str(raised.value).startswith(
        f"PostgreSQL runs as postgres (uid {cluster.account.pw_uid}), who cannot reach {home / 'data'} "
        f"({home} is mode 0700, owner root): "
    ), raised.value
    assert not (home / "data" / "data").exists()  # initdb never ran


def test_up_with_its_state_directory_under_a_private_directory_runs(open_tmp):
    home = private(open_tmp / "home")
    state = home / "checkout" / ".local-stack"
    (home / "checkout").mkdir(mode=0o755)
    datadir, moved = up.postgres_dir(state)
    assert datadir.parent == up.OUTSIDE_DATA_ROOT and f"cannot reach {state} ({home} is mode 0700" in moved
    try:
        process, output = start(state, 1)
        try:
            assert f"its data directory is outside the state directory: {moved}" in output, output
            assert f"in {datadir} on port" in output
            credentials = (state / "credentials.json").read_text()
            with psycopg.connect(json.loads(credentials)["singularity_1"]["database_url"]) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            assert "stopping PostgreSQL" in stop(process)
        # Restarted, it finds the same data (the same hash of the state directory's path).
        assert up.postgres_dir(state)[0] == datadir
    finally:
        shutil.rmtree(datadir, ignore_errors=True)


def test_the_cli_says_so_in_one_line_when_the_data_cannot_move_out(open_tmp):
    home = private(open_tmp / "home")
    blocked_root = home / "elsewhere"
    code = (
        "import sys; from pathlib import Path; from singularity_stack.local import up; "
        f"up.OUTSIDE_DATA_ROOT = Path({str(blocked_root)!r}); from singularity_stack import cli; sys.exit(cli.main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "up", "--no-services", "--state-dir", str(home / "state")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: PostgreSQL runs as postgres (uid {LocalCluster(open_tmp).account.pw_uid}), who cannot reach "
        f"{home / 'state'} ({home} is mode 0700, owner root), and {blocked_root} is no root-owned directory it "
        "can reach: pass a --state-dir it can reach"
    ], result.stderr
