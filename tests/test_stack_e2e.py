"""The whole stack, end to end: `singularity-stack up` starts real processes on a real PostgreSQL;
tasks go Singularity → Nexus (offline model) → Genesis (sandbox) → a human in headless Chromium.
Two Nexus and two Genesis processes (--nexus-workers 2 --genesis-workers 2) share their queues' work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from support import CHROMIUM, CHROMIUM_ARGS


@dataclass
class LiveStack:
    state: dict
    state_file: Path
    process: subprocess.Popen

    def url(self, name: str) -> str:
        return self.state["services"][name]["url"]

    def pid(self, name: str) -> int:
        return json.loads(self.state_file.read_text())["services"][name]["pid"]

    @property
    def token(self) -> str:
        return self.state["ui"]["token"]

    def api_headers(self, service: str) -> dict[str, str]:
        """Singularity's and CentralCloud's bearer token, as `up` wrote it to the state file."""
        return {"Authorization": f"Bearer {self.state['api_tokens'][service]}"}

    def nexus_api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url("nexus"), headers={"Authorization": f"Bearer {self.token}"}, timeout=10)


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory) -> Iterator[LiveStack]:
    state_dir = tmp_path_factory.mktemp("stack")
    state_dir.chmod(0o755)
    for parent in state_dir.parents:  # the PostgreSQL account must reach its data directory
        if str(parent).startswith("/tmp/pytest-of-"):
            parent.chmod(0o755)
    state_file = state_dir / "state.json"
    log = (state_dir / "up.log").open("w")
    env = {**os.environ, "HUMAN_TIMEOUT_SECONDS": "120", "LLM_TIMEOUT_SECONDS": "60", "JOB_TIMEOUT_SECONDS": "60"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "singularity_stack.cli",
            "up",
            "--state-dir",
            str(state_dir),
            "--singularity-instances",
            "2",
            "--nexus-workers",
            "2",
            "--genesis-workers",
            "2",
            "--state-file",
            str(state_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 180
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the stack did not come up:\n" + (state_dir / "up.log").read_text())
        time.sleep(0.2)
    stack = LiveStack(json.loads(state_file.read_text()), state_file, process)
    try:
        yield stack
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        output = (state_dir / "up.log").read_text()
        assert "stopping the services" in output and "stopping PostgreSQL" in output, output


def submit(stack: LiveStack, instance: str, description: str, **extra) -> str:
    response = httpx.post(
        f"{stack.url(instance)}/tasks",
        json={"description": description, **extra},
        headers=stack.api_headers("singularity"),
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def task_of(stack: LiveStack, instance: str, task_id: str) -> dict:
    return httpx.get(
        f"{stack.url(instance)}/tasks/{task_id}", headers=stack.api_headers("singularity"), timeout=10
    ).json()


def wait_task(stack: LiveStack, instance: str, task_id: str, until, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = task_of(stack, instance, task_id)
        if until(task):
            return task
        assert time.monotonic() < deadline, f"task stuck: {json.dumps(task, indent=1)[:3000]}"
        time.sleep(0.2)


def finished(task: dict) -> bool:
    return task["state"] in ("succeeded", "failed")


def pending_card(stack: LiveStack, kind: str, agent_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    with stack.nexus_api() as api:
        while True:
            cards = api.get("/api/pending").json()[f"{kind}s"]
            mine = [card for card in cards if card["agent_id"] == agent_id]
            if mine:
                return mine[0]
            assert time.monotonic() < deadline, f"no {kind} card for {agent_id}"
            time.sleep(0.2)


def test_task_approved_in_the_browser_completes_with_its_steps_and_cost(live_stack):
    if not CHROMIUM.exists():
        pytest.skip(f"BROWSER TEST SKIPPED: {CHROMIUM} is missing (scripts/test.sh installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    task_id = submit(
        live_stack, "singularity_1", "Write a program that prints a friendly greeting", agent_id="e2e-approve"
    )
    card = pending_card(live_stack, "approval", "e2e-approve")
    assert card["file_path"] == "main.py"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(live_stack.url("nexus") + "/")
        page.fill("input[name=token]", live_stack.token)
        page.click("button[type=submit]")
        card_el = page.locator(f"[data-request-id='{card['request_id']}']")
        card_el.wait_for(timeout=15_000)
        assert "e2e-approve" in card_el.inner_text()
        card_el.get_by_role("button", name="Approve").click()
        card_el.wait_for(state="detached", timeout=15_000)
        browser.close()
    task = wait_task(live_stack, "singularity_1", task_id, finished)
    assert task["state"] == "succeeded", task["failure_reason"]
    assert [s["phase"] for s in task["steps"]] == [
        "specification",
        "pseudocode",
        "architecture",
        "refinement",
        "refinement",
        "completion",
        "completion",
    ]
    assert all(s["state"] == "done" for s in task["steps"])
    assert task["models_used"] == ["offline"]
    assert task["cost_usd"] == 0  # the offline stand-in is free
    job = next(s for s in task["steps"] if s["kind"] == "job")
    assert job["reply"]["status"] == "ok"
    assert task["result"]["output"] == "Hello, world!\n"


def test_rejected_task_fails_with_the_reviewers_reason(live_stack):
    task_id = submit(live_stack, "singularity_2", "Write a program that lists prime numbers", agent_id="e2e-reject")
    card = pending_card(live_stack, "approval", "e2e-reject")
    with live_stack.nexus_api() as api:
        assert (
            api.post(f"/api/approvals/{card['request_id']}", json={"approved": False, "reason": ""}).status_code == 422
        )
        decided = api.post(f"/api/approvals/{card['request_id']}", json={"approved": False, "reason": "needs tests"})
        assert decided.status_code == 200, decided.text
    task = wait_task(live_stack, "singularity_2", task_id, finished)
    assert task["state"] == "failed"
    assert task["failure_reason"].startswith("completion: rejected by") and task["failure_reason"].endswith(
        "needs tests"
    )


def test_ambiguous_task_asks_a_question_then_goes_on(live_stack):
    task_id = submit(live_stack, "singularity_1", "Improve it?", agent_id="e2e-question")
    card = pending_card(live_stack, "question", "e2e-question")
    assert "Could you say more" in card["question"]
    with live_stack.nexus_api() as api:
        assert api.post(f"/api/questions/{card['request_id']}", json={"response": "print hello"}).status_code == 200
    approval = pending_card(live_stack, "approval", "e2e-question")
    with live_stack.nexus_api() as api:
        api.post(f"/api/approvals/{approval['request_id']}", json={"approved": True, "reason": ""})
    task = wait_task(live_stack, "singularity_1", task_id, finished)
    assert task["state"] == "succeeded"
    assert task["steps"][0]["kind"] == "question"


# What only a program in that language looks like (the offline model's programs; Genesis ran each as the task's
# language, so a program in another language would have failed its syntax check).
LANGUAGE_MARKERS = {
    "python": 'if __name__ == "__main__":',
    "javascript": "console.log(",
    "bash": "#!/usr/bin/env bash",
    "elixir": "IO.puts(",
}


@pytest.mark.parametrize("language", sorted(LANGUAGE_MARKERS))
def test_a_task_in_each_language_succeeds_offline_at_no_cost(live_stack, language):
    agent = f"e2e-lang-{language}"
    task_id = submit(
        live_stack,
        "singularity_2",
        "Write a program that prints a friendly greeting",
        language=language,
        agent_id=agent,
    )
    card = pending_card(live_stack, "approval", agent)
    source_name = {"python": "main.py", "javascript": "main.js", "bash": "main.sh", "elixir": "main.exs"}[language]
    assert card["file_path"] == source_name
    with live_stack.nexus_api() as api:
        decided = api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""})
        assert decided.status_code == 200, decided.text
    task = wait_task(live_stack, "singularity_2", task_id, finished)
    assert task["state"] == "succeeded", task["failure_reason"]
    # No fix round was needed: the first program passed Genesis's syntax check and lint.
    assert [s["name"] for s in task["steps"] if s["kind"] == "job"] == ["validate-round-1"]
    (job,) = [s for s in task["steps"] if s["kind"] == "job"]
    assert job["reply"]["status"] == "ok" and job["reply"]["lint"] == [], job["reply"]
    assert task["models_used"] == ["offline"] and task["cost_usd"] == 0
    result = task["result"]
    assert result["file_path"] == source_name
    assert LANGUAGE_MARKERS[language] in result["code"]
    assert "offline stand-in" in result["code"].lower()
    assert result["output"] == "Hello, world!\n"


def test_two_instances_at_once_never_cross_replies(live_stack):
    ids = {
        instance: [
            submit(live_stack, instance, f"Write a program that prints {n}", agent_id=f"e2e-{instance}-{n}")
            for n in range(3)
        ]
        for instance in ("singularity_1", "singularity_2")
    }
    with live_stack.nexus_api() as api:
        for instance, tasks in ids.items():
            for n in range(len(tasks)):
                card = pending_card(live_stack, "approval", f"e2e-{instance}-{n}")
                assert card["instance"] == instance
                api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""})
    for instance, tasks in ids.items():
        for task_id in tasks:
            task = wait_task(live_stack, instance, task_id, finished)
            assert task["state"] == "succeeded" and task["instance"] == instance


def test_services_killed_mid_task_are_restarted_and_the_task_completes(live_stack):
    task_id = submit(live_stack, "singularity_2", "Write a program that prints the alphabet", agent_id="e2e-kill")
    os.kill(live_stack.pid("genesis"), signal.SIGKILL)  # while the task is in its first phases
    card = pending_card(live_stack, "approval", "e2e-kill")
    os.kill(live_stack.pid("singularity_2"), signal.SIGKILL)  # the asker dies while a human decides
    with live_stack.nexus_api() as api:
        assert (
            api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""}).status_code == 200
        )

    def answered(task: dict) -> bool:
        return finished(task)

    deadline = time.monotonic() + 60
    while True:  # singularity_2 comes back under the supervisor
        try:
            task = wait_task(live_stack, "singularity_2", task_id, answered)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert task["state"] == "succeeded", task["failure_reason"]
    assert len(task["steps"]) == 7  # nothing was asked twice


def test_the_apis_need_the_tokens_up_generated(live_stack):
    up_log = (live_stack.state_file.parent / "up.log").read_text()
    for service in ("singularity", "centralcloud"):
        assert live_stack.state["api_tokens"][service] in up_log  # printed, and in the state file
    stranger = httpx.post(f"{live_stack.url('singularity_1')}/tasks", json={"description": "x"}, timeout=10)
    assert stranger.status_code == 401, stranger.text
    assert httpx.get(f"{live_stack.url('centralcloud')}/analytics", timeout=10).status_code == 401
    analytics = httpx.get(
        f"{live_stack.url('centralcloud')}/analytics", headers=live_stack.api_headers("centralcloud"), timeout=10
    )
    assert analytics.status_code == 200, analytics.text


def test_a_reviewer_named_while_up_runs_decides_under_their_own_name(live_stack):
    """Last in this module: while a reviewer is named, the shared token the other tests use is off."""
    submit(live_stack, "singularity_1", "Write a program that prints a greeting", agent_id="e2e-named")
    card = pending_card(live_stack, "approval", "e2e-named")
    reviewers_file = live_stack.state["ui"]["reviewers_file"]
    command = [sys.executable, "-m", "singularity_stack.cli", "reviewers"]
    added = subprocess.run([*command, "add", "grace", "--file", reviewers_file], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    grace = {"Authorization": f"Bearer {added.stdout.strip().splitlines()[-1]}"}
    try:
        with live_stack.nexus_api() as api:
            assert api.get("/api/pending").status_code == 401  # the shared token is off now
            decided = api.post(f"/api/approvals/{card['request_id']}", json={"approved": True}, headers=grace)
            assert decided.status_code == 200, decided.text
        nexus_db = json.loads(Path(live_stack.state["credentials_file"]).read_text())["nexus"]["database_url"]
        with psycopg.connect(nexus_db) as conn:
            audit = conn.execute(
                "SELECT action, actor FROM hitl_audit WHERE request_id = %s ORDER BY id", (card["request_id"],)
            ).fetchall()
        assert audit == [("received", "system"), ("approved", "grace")]
    finally:
        removed = subprocess.run(
            [*command, "remove", "grace", "--file", reviewers_file], capture_output=True, text=True
        )
        assert removed.returncode == 0, removed.stderr
    with live_stack.nexus_api() as api:
        assert api.get("/api/pending", headers=grace).status_code == 401
        assert api.get("/api/pending").status_code == 200  # nobody named: the shared token works again


def test_two_nexus_processes_share_the_work_and_each_browser_sees_the_other(live_stack):
    """A browser on each Nexus process: the card shows on both, the decision on one clears the other; every
    LLM request of the task is answered once between the two processes, and every job once."""
    if not CHROMIUM.exists():
        pytest.skip(f"BROWSER TEST SKIPPED: {CHROMIUM} is missing (scripts/test.sh installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    assert live_stack.pid("nexus") != live_stack.pid("nexus-2")
    assert live_stack.pid("genesis") != live_stack.pid("genesis-2")
    task_id = submit(live_stack, "singularity_1", "Write a program that prints a limerick", agent_id="e2e-workers")
    card = pending_card(live_stack, "approval", "e2e-workers")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pages = []
        for name in ("nexus", "nexus-2"):
            page = browser.new_context().new_page()
            page.goto(live_stack.url(name) + "/")
            page.fill("input[name=token]", live_stack.token)
            page.click("button[type=submit]")
            page.locator("#connection").filter(has_text="live").wait_for(timeout=15_000)
            page.locator(f"[data-request-id='{card['request_id']}']").wait_for(timeout=15_000)
            pages.append(page)
        first, second = pages
        second.locator(f"[data-request-id='{card['request_id']}']").get_by_role("button", name="Approve").click()
        first.locator(f"[data-request-id='{card['request_id']}']").wait_for(state="detached", timeout=15_000)
        browser.close()
    task = wait_task(live_stack, "singularity_1", task_id, finished)
    assert task["state"] == "succeeded", task["failure_reason"]
    llm_steps = [s["request_id"] for s in task["steps"] if s["kind"] == "llm"]
    credentials = json.loads(Path(live_stack.state["credentials_file"]).read_text())
    with psycopg.connect(credentials["nexus"]["database_url"]) as conn:
        handled = conn.execute(
            "SELECT request_id::text, count(*) FROM llm_calls WHERE request_id::text = ANY(%s) GROUP BY 1",
            (llm_steps,),
        ).fetchall()
    assert sorted(handled) == sorted((request_id, 1) for request_id in llm_steps)
