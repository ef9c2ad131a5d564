"""A checkout under a private directory (root's home, mode 0700): Genesis's jobs run as nobody, who cannot
reach the venv's ruff there. Lint findings must still come back to the requester, and a linter that cannot
run must come back as an error, never as "no findings"; Singularity must not take that error for clean code.

The private layout is real: a root-owned 0700 directory holding a venv-like tree with the real ruff binary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sandbox_support import require_tool
from test_singularity import deduplicate, submit, wait_for_state, world  # noqa: F401 (the workflow's fixtures)

from singularity_stack import contract as c
from singularity_stack import reachable
from singularity_stack.genesis import languages, tools
from singularity_stack.genesis.languages import PYTHON, RUFF
from singularity_stack.genesis.service import GenesisService, GenesisSettings

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="NEEDS ROOT: only a root Genesis runs jobs as another account (nobody), the case a private "
    "checkout breaks; CI runs as root",
)

UNUSED_IMPORT = "import os\n\nprint('still runs')\n"


@pytest.fixture
def private_dir(open_tmp: Path) -> Iterator[Path]:
    """A root-owned 0700 directory, like /root: nobody may not even pass through it."""
    path = open_tmp / "home"
    path.mkdir(mode=0o700)
    os.chown(path, 0, 0)
    path.chmod(0o700)
    yield path


@pytest.fixture
def copies(open_tmp: Path, monkeypatch) -> Path:
    """Where Genesis puts copies it makes reachable: a fresh place per test, and the prepared tools forgotten."""
    root = open_tmp / "reachable"
    monkeypatch.setattr(reachable, "CACHE_ROOTS", (root,))
    tools.prepare_tool.cache_clear()
    yield root
    tools.prepare_tool.cache_clear()


def real_ruff() -> str:
    path = RUFF.locate()
    if path is None:
        pytest.skip("MISSING TOOL: `ruff` not found — pip install ruff (it is in the [test] extra)")
    return path


def ruff_under(private_dir: Path) -> Path:
    """The venv layout of a checkout in a private directory: <private>/checkout/.venv/bin/ruff."""
    bindir = private_dir / "checkout" / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for directory in (private_dir / "checkout", private_dir / "checkout" / ".venv", bindir):
        directory.chmod(0o755)  # only the private parent is in the way, as in /root/<checkout>
    ruff = bindir / "ruff"
    shutil.copy2(real_ruff(), ruff)
    return ruff


def fake_tool(directory: Path, script: str) -> Path:
    """A stand-in linter (a shell script the sandbox's /bin/sh runs) in a directory nobody can reach."""
    path = directory / "ruff"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def python_linted_by(monkeypatch, locate: object) -> None:
    """Python jobs linted by the ruff at `locate()`, for this test (the service looks languages up by name)."""
    linter = dataclasses.replace(RUFF, locate=locate)
    monkeypatch.setitem(languages.LANGUAGES, c.Language.PYTHON, dataclasses.replace(PYTHON, linter=linter))


async def genesis_answers(sq, request: c.JobRequest) -> tuple[dict, dict[str, str]]:
    """Run the real Genesis service on `request`; the reply as the requester reads it, and /readyz's details."""
    sender = await sq.queue(request.reply_to)
    await sender.publish(request)
    creds = sq.result.credentials["genesis"]
    service = GenesisService(GenesisSettings(database_url=creds.database_url, shared_queue_url=creds.shared_queue_url))
    await service.start()
    try:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app()), base_url="http://localhost")
        details = (await client.get("/readyz")).json()["details"]
        deadline = asyncio.get_running_loop().time() + 120  # a few sandboxes; generous for a loaded machine
        query = f"SELECT message FROM pgmq.q_job_results_{request.reply_to}"
        while not (replies := sq.owner_query(query)):
            assert asyncio.get_running_loop().time() < deadline, "no reply"
            await asyncio.sleep(0.05)
    finally:
        await service.stop()
    [(reply,)] = replies
    return reply, details


def job(code: str, run: bool = True) -> c.JobRequest:
    return c.JobRequest(reply_to="singularity_1", agent_id="a-1", code=code, language="python", run=run)


async def test_lint_findings_come_back_when_ruff_is_under_a_private_directory(sq, private_dir, copies, monkeypatch):
    require_tool("bwrap", "bubblewrap")
    ruff = ruff_under(private_dir)
    python_linted_by(monkeypatch, lambda: str(ruff))
    reply, details = await genesis_answers(sq, job(UNUSED_IMPORT))
    assert reply["status"] == "ok", reply
    assert reply["output"] == "still runs\n"
    assert any("F401" in finding and "`os` imported but unused" in finding for finding in reply["lint"]), reply
    # /readyz says where the jobs' ruff is and why it is a copy.
    assert details["lint_python"].startswith(f"ruff at {copies}/"), details
    assert f"cannot reach {ruff} ({private_dir} is mode 0700" in details["lint_python"], details
    copy = Path(details["lint_python"].split()[2])
    info = copy.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode), copy.read_bytes() == ruff.read_bytes()) == (0, 0o755, True)


async def test_a_ruff_nobody_can_reach_and_nothing_can_copy_is_an_error_naming_path_and_fix(
    sq, private_dir, monkeypatch
):
    ruff = ruff_under(private_dir)
    python_linted_by(monkeypatch, lambda: str(ruff))
    monkeypatch.setattr(reachable, "CACHE_ROOTS", (private_dir / "cache",))  # unreachable too: no copy helps
    tools.prepare_tool.cache_clear()
    try:
        reply, details = await genesis_answers(sq, job(UNUSED_IMPORT))
    finally:
        tools.prepare_tool.cache_clear()
    assert reply["status"] == "error" and reply["lint"] == [] and reply["output"] == "", reply
    expected = f"Genesis runs jobs as nobody (uid 65534), who cannot reach {ruff} ({private_dir} is mode 0700"
    assert reply["error"].startswith(f"lint: {expected}"), reply["error"]
    assert "move the checkout under a directory others may traverse" in reply["error"]
    assert reply["error"].count("\n") == 1  # one line
    assert details["lint_python"].startswith(f"error: {expected}"), details


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("exit 2", "ruff failed (runtime_error, exit 2)"),  # crashed
        ("echo 'not json'", "unreadable output: 'not json"),
        ("echo '{\"a\": 1}'", "unexpected output"),
        ("echo '[]'; exit 1", "ruff exited 1 without reporting a finding"),
        ("kill -9 $$", "ruff failed (timeout, exit 137)"),  # killed
    ],
)
async def test_a_lint_tool_that_does_not_work_is_an_error_not_clean_code(
    sq, private_dir, copies, monkeypatch, script, reason
):
    tool = fake_tool(private_dir, script)
    python_linted_by(monkeypatch, lambda: str(tool))
    reply, _ = await genesis_answers(sq, job("print('clean')\n", run=False))
    assert (reply["status"], reply["lint"]) == ("error", []), reply
    assert reply["error"].startswith("lint: ") and reason in reply["error"], reply["error"]


async def test_a_missing_linter_is_an_error_saying_how_to_install_it(sq, monkeypatch):
    python_linted_by(monkeypatch, lambda: None)
    reply, details = await genesis_answers(sq, job("print('clean')\n"))
    assert reply["status"] == "error" and reply["output"] == "", reply
    assert reply["error"] == "lint: ruff is not installed: pip install ruff into Genesis's virtualenv " + (
        "(scripts/setup.sh installs it)\n"
    )
    assert details["lint_python"].startswith("error: ruff is not installed")


async def test_singularity_fails_a_task_genesis_could_not_lint_without_a_fix_round(world):  # noqa: F811
    stand_ins, start = world
    stand_ins.job = lambda r: c.JobResult(
        **c.reply_fields(r), status=c.JobStatus.ERROR, error="lint: ruff is not installed: pip install ruff\n"
    )
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a greeting"))
    assert task["state"] == "failed", task
    assert task["failure_reason"].startswith("refinement: Genesis could not check the code: lint: ruff is not"), task
    assert [s["name"] for s in task["steps"]][-1] == "validate-round-1"  # no model was asked to "fix" it
    assert len(stand_ins.seen["job"]) == 1
