"""`singularity-stack up`: a local PostgreSQL with the five databases, stopped cleanly on Ctrl-C, restartable."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

CLI = [sys.executable, "-m", "singularity_stack.cli"]


def start(state_dir, instances: int, *options: str) -> tuple[subprocess.Popen, str]:
    """`up` with --no-services, or with `options` (e.g. --state-file PATH) and the services."""
    process = subprocess.Popen(
        [
            *CLI,
            "up",
            *(options or ["--no-services"]),
            "--state-dir",
            str(state_dir),
            "--singularity-instances",
            str(instances),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    deadline = time.monotonic() + 240
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


def api(url: str, token: str, body: dict[str, object] | None = None) -> dict[str, object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_up_scales_3_to_1_to_3_keeping_the_retired_instance(open_tmp):
    """Down to 1: instances 2 and 3 are retired (kept, not started); back to 3: instance 3 has its task again."""
    state, state_file = open_tmp / "stack", open_tmp / "state.json"
    process, _ = start(state, 3, "--state-file", str(state_file))
    try:
        summary = json.loads(state_file.read_text())
        token = summary["api_tokens"]["singularity"]
        third = summary["services"]["singularity_3"]["url"]
        task = api(third + "/tasks", token, {"description": "Write a program that prints a greeting"})
        credentials = json.loads((state / "credentials.json").read_text())
    finally:
        stop(process)

    process, output = start(state, 1, "--state-file", str(state_file))
    try:
        assert "retired, kept and not started: singularity_2, singularity_3" in output
        services = json.loads(state_file.read_text())["services"]
        assert sorted(services) == ["centralcloud", "genesis", "nexus", "singularity_1"]
        lowered = json.loads((state / "credentials.json").read_text())
        assert lowered["retired"] == {name: credentials[name] for name in ("singularity_2", "singularity_3")}
        assert_private(state)
    finally:
        stop(process)

    process, output = start(state, 3, "--state-file", str(state_file))
    try:
        assert "created" not in output and "rotated" not in output  # the same databases, roles and passwords
        assert json.loads((state / "credentials.json").read_text()) == credentials
        third = json.loads(state_file.read_text())["services"]["singularity_3"]["url"]
        with urllib.request.urlopen(third + "/readyz", timeout=30) as response:
            assert response.status == 200
        assert api(f"{third}/tasks/{task['id']}", token)["id"] == task["id"]
    finally:
        stop(process)
