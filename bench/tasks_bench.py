"""Tasks end to end: N offline tasks through the whole stack that `singularity-stack up` runs, each
auto-approved through Nexus's API, in tasks per second.

    .venv/bin/python bench/tasks_bench.py [--tasks 100] [--samples 3] [--workers 1 2]

For each `--workers` value a stack comes up (`up --nexus-workers W --genesis-workers W`, offline model, no
provider key) in a throwaway state directory; each sample submits `--tasks` tasks at once to singularity_1
(one agent each) while an approver approves every pending card through Nexus's API as it appears, and
ends when every task has succeeded. The figure is tasks / (first submit -> last task succeeded). The
requests-per-minute limit guards money and so does not slow these free tasks (LLM_REQUESTS_PER_MINUTE stays
at its default of 60).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from samples import Samples


def start_stack(state_dir: Path, workers: int) -> tuple[subprocess.Popen[bytes], dict]:
    state_file = state_dir / "state.json"
    command = [sys.executable, "-m", "singularity_stack.cli", "up", "--state-dir", str(state_dir)]
    command += ["--state-file", str(state_file), "--nexus-workers", str(workers), "--genesis-workers", str(workers)]
    log = (state_dir / "up.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the stack did not come up:\n" + (state_dir / "up.log").read_text())
        time.sleep(0.2)
    return process, json.loads(state_file.read_text())


def approve_everything(state: dict, stop: threading.Event) -> None:
    """What a reviewer would do, as fast as the API answers: approve each pending card."""
    nexus = state["services"]["nexus"]["url"]
    with httpx.Client(base_url=nexus, headers={"Authorization": f"Bearer {state['ui']['token']}"}) as api:
        while not stop.is_set():
            for card in api.get("/api/pending", timeout=10).json()["approvals"]:
                api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""}, timeout=10)
            time.sleep(0.05)


def run_tasks(state: dict, count: int, round_: int) -> float:
    url = state["services"]["singularity_1"]["url"]
    headers = {"Authorization": f"Bearer {state['api_tokens']['singularity']}"}
    stop = threading.Event()
    approver = threading.Thread(target=approve_everything, args=(state, stop), daemon=True)
    approver.start()
    with httpx.Client(base_url=url, headers=headers, timeout=30) as api:
        started = time.perf_counter()
        ids = [
            api.post(
                "/tasks",
                json={"description": f"Write a program that prints the number {n}", "agent_id": f"bench-{round_}-{n}"},
            ).json()["id"]
            for n in range(count)
        ]
        waiting = set(ids)
        while waiting:
            for task_id in list(waiting):
                task = api.get(f"/tasks/{task_id}").json()
                if task["state"] == "failed":
                    raise RuntimeError(f"task {task_id} failed: {task['failure_reason']}")
                if task["state"] == "succeeded":
                    waiting.discard(task_id)
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    stop.set()
    approver.join(10)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"{args.tasks} offline tasks at once, auto-approved through Nexus's API; {os.cpu_count()} cores")
    for workers in args.workers:
        state_dir = Path(tempfile.mkdtemp(prefix="tasks-bench-"))
        state_dir.chmod(0o755)  # PostgreSQL's account must reach its data directory
        process = None
        try:
            process, state = start_stack(state_dir, workers)
            run_tasks(state, max(1, args.tasks // 10), round_=-1)  # warm-up: caches, pools, the router loaded
            rates = [run_tasks(state, args.tasks, round_) for round_ in range(args.samples)]
            print(f"  {workers} Nexus + {workers} Genesis: {Samples('rate', rates).format('tasks/s', '{:.2f}')}")
        finally:
            if process:
                process.send_signal(signal.SIGINT)
                process.wait(60)
            shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
