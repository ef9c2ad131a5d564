"""How `up` ends: however it is stopped, every child it started (PostgreSQL included) is gone, and the exit
status says how it ended; one `up` per state directory, and what a killed one left is stopped by the next.

All real processes: the children are checked from the process table, by the pids and process groups `up`
recorded in `<state>/children.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from singularity_stack.local.supervisor import process_start_time
from singularity_stack.postgres.cluster import LocalCluster

CLI = [sys.executable, "-m", "singularity_stack.cli"]


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    """One state directory for the module (PostgreSQL's initdb runs once), reachable by its account."""
    root = Path(tempfile.mkdtemp(prefix="singularity-up-"))
    root.chmod(0o755)
    yield root / "stack"
    shutil.rmtree(root, ignore_errors=True)


def up_command(state: Path, *extra: str) -> list[str]:
    return [*CLI, "up", "--state-dir", str(state), "--singularity-instances", "1", *extra]


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = path.read_text() if path.exists() else ""
        if text in output:
            return output
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {text!r} from up:\n" + (path.read_text() if path.exists() else ""))


def recorded(state: Path) -> dict[str, dict]:
    return json.loads((state / "children.json").read_text())


def session_members(sessions: set[int]) -> list[str]:
    """Every live process (not a zombie) whose session is one of `sessions`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if fields[0] != "Z" and int(fields[3]) in sessions:  # state, ppid, pgrp, session
            found.append(f"{entry.name}: {stat[:80]}")
    return found


def assert_all_gone(children: dict[str, dict], timeout: float = 10) -> None:
    sessions = {entry["pgid"] for entry in children.values()}  # each child leads its own session and group
    deadline = time.monotonic() + timeout
    while True:
        alive = [name for name, entry in children.items() if process_start_time(entry["pid"]) == entry["start_time"]]
        left = session_members(sessions)
        if not alive and not left:
            return
        assert time.monotonic() < deadline, f"left running: {alive} {left}"
        time.sleep(0.2)


def test_a_second_up_is_refused_and_a_killed_ups_leftovers_are_stopped_by_the_next(state: Path) -> None:
    log = state.parent / "first.log"
    first = subprocess.Popen(up_command(state, "--no-services"), stdout=log.open("w"), stderr=subprocess.STDOUT)
    output = wait_for(log, "press Ctrl-C", first)
    assert "no services were started (--no-services)" in output and "the stack is up" not in output
    dsn = next(line.split("admin DSN: ", 1)[1] for line in output.splitlines() if "admin DSN: " in line)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    port = json.loads((state / "ports.json").read_text())["postgres"]

    second = subprocess.run(up_command(state, "--no-services"), capture_output=True, text=True, timeout=60)
    assert second.returncode == 3
    assert second.stderr.strip().splitlines() == [
        f"error: {state} is in use by another `up` (pid {first.pid}); stop it first"
    ]
    assert second.stdout == ""
    with psycopg.connect(dsn) as conn:  # the refused one touched nothing
        conn.execute("SELECT 1")

    children = recorded(state)
    first.kill()  # SIGKILL: no clean-up of its own; the kernel tells its children (parent-death signal)
    first.wait()
    assert_all_gone(children, timeout=30)

    # What an `up` that could not stop its children leaves: a recorded process that is still running, and a
    # PostgreSQL running in the data directory (started by hand, or by an older `up` through pg_ctl).
    orphan = subprocess.Popen(["sleep", "600"], start_new_session=True)
    entry = {"pid": orphan.pid, "pgid": orphan.pid, "start_time": process_start_time(orphan.pid), "signal": 15}
    left = {"orphan": entry}
    (state / "children.json").write_text(json.dumps(left))
    cluster = LocalCluster(state / "postgres", port=port).start()
    leftover_postmaster = int((cluster.pgdata / "postmaster.pid").read_text().split()[0])

    log = state.parent / "third.log"
    third = subprocess.Popen(up_command(state, "--no-services"), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        output = wait_for(log, "press Ctrl-C", third)
        assert f"stopping orphan (pid {orphan.pid}), left running by an earlier `up`" in output
        assert "stopping the PostgreSQL left running in" in output
        assert orphan.wait(10) == -signal.SIGTERM
        assert process_start_time(leftover_postmaster) is None
        assert f"on port {port}" in output and f"@127.0.0.1:{port}/" in output  # the same port every time
        children = recorded(state)
        assert children["postgres"]["pid"] != leftover_postmaster
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(60) == 0, log.read_text()
    assert_all_gone(children)


def stop_by_signal_to_group(process: subprocess.Popen, sig: int) -> None:
    os.killpg(process.pid, sig)  # as the terminal does: Ctrl-C, or SIGHUP when it closes


@pytest.mark.parametrize(
    ("how", "status"),
    [
        ("ctrl-c to the process group", 0),
        ("sigterm", 0),
        ("sighup to the process group", 129),
        ("the pipe's reader exits", 141),
        ("the parent shell is killed", 129),
        ("ctrl-c to `up 2>&1 | tee log`", None),
    ],
)
def test_every_child_stops_however_up_is_stopped(state: Path, how: str, status: int | None) -> None:
    log = state.parent / f"up-{how.replace(' ', '-')}.log"
    command = up_command(state, "--state-file", str(state.parent / "state.json"))
    if how == "the pipe's reader exits":
        # `up | tee`: tee dies (Ctrl-C in its terminal, or it is killed); up's writes would get EPIPE.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert process.stdout is not None
        lines = []
        for raw in process.stdout:
            lines.append(raw.decode())
            if "press Ctrl-C" in lines[-1]:
                break
        else:
            raise AssertionError("up did not come up:\n" + "".join(lines))
        children = recorded(state)
        process.stdout.close()
        assert process.wait(60) == status
    elif how.endswith("| tee log`"):
        # The issue's case: Ctrl-C reaches `up` and tee at once; tee dies first, so `up`'s shutdown writes to
        # a pipe nobody reads. (The pipeline's status is tee's; `up` is judged by what it left.)
        shell = subprocess.Popen(
            ["bash", "-c", '"$@" 2>&1 | tee "$LOG" > /dev/null', "bash", *command],
            env={**os.environ, "LOG": str(log)},
            start_new_session=True,
        )
        wait_for(log, "press Ctrl-C", shell)
        children = recorded(state)
        up_pid = int((state / "up.lock").read_text())
        os.killpg(shell.pid, signal.SIGINT)
        shell.wait(60)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{up_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{up_pid}").exists()
    elif how == "the parent shell is killed":
        shell = subprocess.Popen(
            ["bash", "-c", '"$@" > "$LOG" 2>&1 & echo $! ; wait', "bash", *command],
            stdout=subprocess.PIPE,
            env={**os.environ, "LOG": str(log)},
            start_new_session=True,
            text=True,
        )
        assert shell.stdout is not None
        up_pid = int(shell.stdout.readline())
        wait_for(log, "press Ctrl-C", shell)
        children = recorded(state)
        shell.kill()
        shell.wait()
        deadline = time.monotonic() + 60
        while Path(f"/proc/{up_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{up_pid}").exists()
        assert "stopping (the parent process died)" in log.read_text()
    else:
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(log, "press Ctrl-C", process)
        children = recorded(state)
        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            stop_by_signal_to_group(process, signal.SIGHUP if "sighup" in how else signal.SIGINT)
        assert process.wait(60) == status, log.read_text()
        assert "stopping the services" in log.read_text() and "stopping PostgreSQL" in log.read_text()
    assert {"postgres", "centralcloud", "genesis", "nexus", "singularity_1"} <= set(children)
    assert_all_gone(children)
    assert not (state / "children.json").exists()


def test_ports_come_from_port_base_or_stay_those_of_the_last_run(tmp_path: Path) -> None:
    import socket

    from singularity_stack.local.lifecycle import UpError
    from singularity_stack.local.up import choose_ports, service_names

    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    names = ["postgres", *service_names(2)]
    assert names == ["postgres", "centralcloud", "genesis", "nexus", "singularity_1", "singularity_2"]
    first = choose_ports(state, names, None)
    assert choose_ports(state, names, None) == first  # kept in the state directory
    with socket.socket() as taken:  # something else took nexus's port meanwhile: nexus alone gets a new one
        taken.bind(("127.0.0.1", first["nexus"]))
        taken.listen()
        again = choose_ports(state, names, None)
    assert again["nexus"] != first["nexus"] and {k: v for k, v in again.items() if k != "nexus"} == {
        k: v for k, v in first.items() if k != "nexus"
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]  # busy while bound
        with pytest.raises(UpError, match=rf"--port-base {base}: in use: {base} \(postgres\)"):
            choose_ports(state, names, base)
    base = 20000 + os.getpid() % 20000
    assert choose_ports(state, names, base) == {name: base + i for i, name in enumerate(names)}
    assert choose_ports(state, names, None) == {name: base + i for i, name in enumerate(names)}


def test_postgres_killed_with_a_task_in_flight_is_restarted_and_the_task_completes(state: Path) -> None:
    import httpx

    log = state.parent / "up-postgres-killed.log"
    state_file = state.parent / "state-pg.json"
    env = {**os.environ, "HUMAN_TIMEOUT_SECONDS": "180", "LLM_TIMEOUT_SECONDS": "120", "JOB_TIMEOUT_SECONDS": "120"}
    process = subprocess.Popen(
        up_command(state, "--state-file", str(state_file)), stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_for(log, "press Ctrl-C", process)
        summary = json.loads(state_file.read_text())
        singularity = summary["services"]["singularity_1"]["url"]
        headers = {"Authorization": f"Bearer {summary['api_tokens']['singularity']}"}
        ui = {"Authorization": f"Bearer {summary['ui']['token']}"}
        nexus = summary["services"]["nexus"]["url"]
        submitted = httpx.post(
            f"{singularity}/tasks",
            json={"description": "Write a program that prints a greeting", "agent_id": "pg-killed"},
            headers=headers,
            timeout=10,
        )
        assert submitted.status_code == 202, submitted.text
        task_id = submitted.json()["id"]

        postmaster = recorded(state)["postgres"]
        os.kill(postmaster["pid"], signal.SIGKILL)  # the task is in its first phases
        answers = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until PostgreSQL is back: every answer comes within a second
            started = time.monotonic()
            response = httpx.get(f"{singularity}/tasks/{task_id}", headers=headers, timeout=10)
            answers.append((response.status_code, time.monotonic() - started, response.text))
            if response.status_code == 200 and any(code == 503 for code, _, _ in answers):
                break
            time.sleep(0.2)
        unavailable = [answer for answer in answers if answer[0] == 503]
        assert unavailable, answers
        assert all(seconds < 1.5 for _, seconds, _ in answers), answers
        assert all(json.loads(text)["error"].startswith("database unavailable (") for _, _, text in unavailable)
        assert answers[-1][0] == 200, answers[-1]
        restarted = recorded(state)["postgres"]
        assert restarted["pid"] != postmaster["pid"]
        assert "postgres exited with code -9" in log.read_text()

        deadline = time.monotonic() + 120  # the workflow goes on by itself, up to the human's approval
        card = None
        while card is None:
            assert time.monotonic() < deadline, "no approval card"
            pending = httpx.get(f"{nexus}/api/pending", headers=ui, timeout=10)
            if pending.status_code == 200:
                card = next((c for c in pending.json()["approvals"] if c["agent_id"] == "pg-killed"), None)
            time.sleep(0.5)
        decided = httpx.post(
            f"{nexus}/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""}, headers=ui, timeout=10
        )
        assert decided.status_code == 200, decided.text
        while True:
            task = httpx.get(f"{singularity}/tasks/{task_id}", headers=headers, timeout=10).json()
            if task["state"] in ("succeeded", "failed"):
                break
            assert time.monotonic() < deadline, task
            time.sleep(0.5)
        assert task["state"] == "succeeded", task
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()


def test_under_nohup_a_hangup_does_not_stop_up(state: Path) -> None:
    log = state.parent / "up-nohup.log"
    process = subprocess.Popen(
        ["nohup", *up_command(state, "--no-services")], stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        wait_for(log, "press Ctrl-C", process)
        process.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert process.poll() is None, log.read_text()
        children = recorded(state)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
    assert_all_gone(children)


def test_up_with_stdout_and_stderr_closed_stops_at_once_leaving_nothing(state: Path) -> None:
    run = subprocess.run(
        ["bash", "-c", '"$@" >&- 2>&-', "bash", *up_command(state, "--no-services")], timeout=120, check=False
    )
    assert run.returncode == 141
    assert not (state / "children.json").exists()
    postmaster = state / "postgres" / "data" / "postmaster.pid"
    assert not postmaster.exists()
