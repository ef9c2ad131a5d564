"""`singularity-stack up`: a local PostgreSQL with the five databases, stopped cleanly on Ctrl-C, restartable."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg

CLI = [sys.executable, "-m", "singularity_stack.cli"]


def start(state_dir, instances: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [*CLI, "up", "--no-services", "--state-dir", str(state_dir), "--singularity-instances", str(instances)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if "press Ctrl-C" in line:
            return process, "".join(output)
    process.kill()
    raise AssertionError("stack did not come up:\n" + "".join(output))


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, rest
    return rest


def assert_private(state: Path) -> None:
    """The state directory is ours alone (PostgreSQL's account, when it is not ours, may only pass through)."""
    info = state.lstat()
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
    if os.geteuid() == 0:
        assert stat.S_IMODE(info.st_mode) == 0o710
        assert info.st_gid == (state / "postgres").stat().st_gid != 0
    else:
        assert stat.S_IMODE(info.st_mode) == 0o700
    assert stat.S_IMODE((state / "credentials.json").stat().st_mode) == 0o600


def test_up_provisions_prints_and_stops_cleanly_then_restarts_unchanged(open_tmp):
    state = open_tmp / "stack"
    process, output = start(state, 2)
    try:
        assert "created database shared_queue" in output
        assert "singularity_2  DATABASE_URL=postgresql://singularity_2:" in output
        credentials = json.loads((state / "credentials.json").read_text())
        assert_private(state)
        with psycopg.connect(credentials["centralcloud"]["shared_queue_url"]) as conn:
            assert conn.execute("SELECT count(*) FROM pgmq.meta").fetchone()[0] == 2 * (4 + 4 * 2)
    finally:
        assert "stopping PostgreSQL" in stop(process)

    process, output = start(state, 3)  # same data, same passwords, one more instance
    try:
        assert "created database shared_queue" not in output
        assert "created database singularity_3" in output
        again = json.loads((state / "credentials.json").read_text())
        assert again["nexus"] == credentials["nexus"]
        with psycopg.connect(again["singularity_3"]["database_url"]) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("singularity_3",)
    finally:
        stop(process)
