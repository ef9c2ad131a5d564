"""`singularity-stack up`: a local PostgreSQL with the five databases, stopped cleanly on Ctrl-C, restartable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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
        if "the stack is up" in line:
            return process, "".join(output)
    process.kill()
    raise AssertionError("stack did not come up:\n" + "".join(output))


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, rest
    return rest


def test_up_provisions_prints_and_stops_cleanly_then_restarts_unchanged(open_tmp):
    state = open_tmp / "stack"
    process, output = start(state, 2)
    try:
        assert "created database shared_queue" in output
        assert "singularity_2  DATABASE_URL=postgresql://singularity_2:" in output
        credentials = json.loads((state / "credentials.json").read_text())
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
