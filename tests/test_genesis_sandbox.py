"""The Genesis code sandbox: each language's happy path, and hostile code contained with the right status.

These tests run real jobs in bubblewrap. They need Debian's bubblewrap, nodejs, elixir and shellcheck
(scripts/debian-test-packages.txt) and ruff from the venv; a test whose tool is missing is skipped
with a reason that names the tool.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pydantic
import pytest
from sandbox_support import (
    LANGUAGES,
    HostProcess,
    JobWatch,
    assert_nothing_left_running,
    require_language,
    require_tool,
)

from singularity_stack.genesis import phase_output, sandbox
from singularity_stack.genesis.languages import RUFF, UnsupportedLanguage, get_language
from singularity_stack.genesis.runner import JobOutcome, JobRunner, JobStatus
from singularity_stack.genesis.sandbox import SANDBOX_UID, KiB, Limits, MiB

# Shorter than the production defaults so the hostile cases finish quickly; BEAM start-up needs ~0.5 s.
LIMITS = Limits(wall_time_s=6, cpu_time_s=2)
FAST_TIMEOUT = Limits(wall_time_s=1.5, cpu_time_s=1)


@pytest.fixture
def runner(sandbox_ready: None) -> JobRunner:
    return JobRunner(max_concurrent=4, limits=LIMITS)


def fast_runner() -> JobRunner:
    return JobRunner(max_concurrent=1, limits=FAST_TIMEOUT)


# -- the happy paths -----------------------------------------------------------------------------------

HELLO = {
    "python": 'print("hello, genesis")\n',
    "javascript": 'console.log("hello, genesis");\n',
    "bash": 'echo "hello, genesis"\n',
    "elixir": 'IO.puts("hello, genesis")\n',
}


@pytest.mark.parametrize("language", LANGUAGES)
async def test_hello_world_runs_ok(runner: JobRunner, language: str) -> None:
    require_language(language)
    outcome = await runner.run(HELLO[language], language)
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.stdout == "hello, genesis\n"
    assert outcome.exit_code == 0
    # A language whose interpreter compiles the whole file first has its run for a syntax check: no other.
    checked_apart = not get_language(language).compiles_before_running
    assert set(outcome.timings_ms) - {"lint"} == {"run", "total"} | ({"syntax"} if checked_apart else set())
    assert all(ms >= 0 for ms in outcome.timings_ms.values())


SYNTAX_ERRORS = {
    # language: (code that would print "ran" first if any of it ran, what a helpful message contains)
    "python": ('print("ran")\ndef broken(:\n    pass\n', ["SyntaxError", "line 2"]),
    "javascript": ('console.log("ran");\nconsole.log((1 + 2);\n', ["SyntaxError", "main.js"]),
    "bash": ("echo ran\nif then fi\n", ["syntax error", "line 2"]),
    "elixir": ('IO.puts("ran")\nIO.puts("unterminated"\n', ["main.exs", "missing terminator"]),
}


@pytest.mark.parametrize("language", LANGUAGES)
async def test_syntax_error_is_reported_and_never_run(runner: JobRunner, language: str) -> None:
    require_language(language)
    code, hints = SYNTAX_ERRORS[language]
    outcome = await runner.run(code, language)
    assert outcome.status is JobStatus.SYNTAX_ERROR, outcome
    for hint in hints:
        assert hint in outcome.stderr
    assert outcome.exit_code is None
    assert outcome.stdout == "" and "ran" not in outcome.stderr  # none of the code ran
    assert "syntax" in outcome.timings_ms  # the syntax check decided, in every language
    if not get_language(language).compiles_before_running:
        assert "run" not in outcome.timings_ms  # bash runs each command as it reads it: checked before any


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_program_printing_a_syntax_error_is_still_a_runtime_error(runner: JobRunner, language: str) -> None:
    """Where the run is the syntax check, a failed run is judged by the separate check on the source as it
    was: a program that writes a compiler's words and fails is a runtime error, as it always was."""
    require_language(language)
    code = {
        "python": 'import sys\nsys.stderr.write("SyntaxError: invalid syntax\\n")\nsys.exit(1)\n',
        "javascript": 'console.error("SyntaxError: Unexpected end of input");\nprocess.exit(1);\n',
        "bash": 'echo "main.sh: line 1: syntax error: unexpected end of file" >&2\nexit 1\n',
        "elixir": 'IO.puts(:stderr, "** (TokenMissingError) main.exs:1: missing terminator")\nSystem.halt(1)\n',
    }[language]
    outcome = await runner.run(code, language)
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert outcome.exit_code == 1


async def test_oversized_source_is_refused_before_any_sandbox(runner: JobRunner) -> None:
    outcome = await runner.run("#" * (LIMITS.max_file_bytes + 1), "python")
    assert outcome.status is JobStatus.SYNTAX_ERROR
    assert "the limit is" in outcome.stderr


RUNTIME_ERRORS = {
    "python": ('raise ValueError("boom")\n', "ValueError: boom"),
    "javascript": ('throw new Error("boom");\n', "Error: boom"),
    "bash": ('echo "boom" >&2\nexit 3\n', "boom"),
    "elixir": ('raise ArgumentError, "boom"\n', "(ArgumentError) boom"),
}


@pytest.mark.parametrize("language", LANGUAGES)
async def test_exception_is_a_runtime_error(runner: JobRunner, language: str) -> None:
    require_language(language)
    code, message = RUNTIME_ERRORS[language]
    outcome = await runner.run(code, language)
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert message in outcome.stderr
    assert outcome.exit_code not in (None, 0)


async def test_python_lint_findings_are_listed_and_the_code_still_runs(runner: JobRunner) -> None:
    if RUFF.locate() is None:
        pytest.skip("MISSING TOOL: `ruff` not found — pip install ruff (it is in the [test] extra)")
    outcome = await runner.run('import os\n\nprint("still runs")\n', "python")
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.stdout == "still runs\n"
    assert any("F401" in finding and "`os` imported but unused" in finding for finding in outcome.lint), outcome.lint
    assert "lint" in outcome.timings_ms


async def test_validation_only_reports_lint_status_without_running(runner: JobRunner) -> None:
    if RUFF.locate() is None:
        pytest.skip("MISSING TOOL: `ruff` not found — pip install ruff (it is in the [test] extra)")
    flagged = await runner.run('import os\n\nprint("never printed")\n', "python", run=False)
    assert flagged.status is JobStatus.LINT
    assert flagged.lint and flagged.stdout == "" and "run" not in flagged.timings_ms
    clean = await runner.run('print("clean")\n', "python", run=False)
    assert clean.status is JobStatus.OK and clean.lint == []


async def test_bash_is_linted_with_shellcheck(runner: JobRunner) -> None:
    require_tool("shellcheck", "shellcheck")
    outcome = await runner.run('echo "$never_assigned"\n', "bash")
    assert outcome.status is JobStatus.OK
    assert any("SC2154" in finding for finding in outcome.lint), outcome.lint


# -- hostile code --------------------------------------------------------------------------------------


def assert_tasks_stayed_within_the_limit(watch: JobWatch) -> None:
    """From the host: the most tasks one job's sandbox ever held, and its cgroup's count where there is one.

    That a fork was refused is the callers' to show (EAGAIN in what the requester received): the process
    rlimit and the cgroup both stop at the same number, and which one refuses first varies from run to run,
    as does whether 10 ms samples catch the peak. What must never happen is more than the limit."""
    peak = max(watch.peak_tasks.values(), default=0)
    assert 0 < peak <= LIMITS.max_processes, f"{peak} tasks in the sandbox at once"
    if job_cgroups_in_force():
        assert 0 < watch.peak_cgroup_tasks <= LIMITS.max_processes, watch.peak_cgroup_tasks


def job_cgroups_in_force() -> bool:
    return sandbox.job_cgroup_tree().tree is not None


async def test_python_fork_bomb_is_stopped_by_the_process_limit(runner: JobRunner, job_watch: JobWatch) -> None:
    outcome = await runner.run("import os\nwhile True:\n    os.fork()\n", "python")
    # Every process forks until the job's process limit refuses, then dies of the BlockingIOError.
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert "Resource temporarily unavailable" in outcome.stderr
    assert_tasks_stayed_within_the_limit(job_watch)
    assert_nothing_left_running(job_watch)


# The classic bomb, then a command that needs a fork of its own: bash retries a refused fork with back-offs
# (1 s, 2 s, 4 s...) longer than the wall clock, so the job lasts until the wall clock ends it, bomb and all.
BASH_FORK_BOMB = ":(){ :|:& };:\nsleep 60\n"


async def test_bash_fork_bomb_is_contained(runner: JobRunner, job_watch: JobWatch) -> None:
    outcome = await runner.run(BASH_FORK_BOMB, "bash")
    assert outcome.status is JobStatus.TIMEOUT and outcome.exit_code is None, outcome
    assert "fork: retry: Resource temporarily unavailable" in outcome.stderr
    assert_tasks_stayed_within_the_limit(job_watch)
    assert_nothing_left_running(job_watch)


async def test_infinite_loop_hits_the_cpu_limit(sandbox_ready: None, job_watch: JobWatch) -> None:
    # A generous wall clock, so that on a loaded machine the CPU limit is still what stops the loop.
    cpu_bound = JobRunner(max_concurrent=1, limits=Limits(wall_time_s=10, cpu_time_s=1))
    outcome = await cpu_bound.run("while True:\n    pass\n", "python")
    assert outcome.status is JobStatus.TIMEOUT, outcome
    assert outcome.exit_code == 128 + 24  # SIGXCPU from RLIMIT_CPU
    assert_nothing_left_running(job_watch)


async def test_sleeping_job_hits_the_wall_clock_limit_and_keeps_its_output(
    sandbox_ready: None, job_watch: JobWatch
) -> None:
    code = 'import time\nprint("before", flush=True)\ntime.sleep(60)\nprint("after")\n'
    outcome = await fast_runner().run(code, "python")
    assert outcome.status is JobStatus.TIMEOUT, outcome
    assert outcome.exit_code is None  # killed by us, not by itself
    assert outcome.stdout == "before\n"
    assert_nothing_left_running(job_watch)


def program_running(process: HostProcess) -> bool:
    return process.name == "python3" and process.cmdline.endswith("python3 -u main.py")


def run_phase_started(process: HostProcess) -> bool:
    """The job's launcher or bwrap exists (one sandbox for all its phases): asyncio may still be connecting
    its pipes."""
    return "genesis-launch" in process.cmdline or process.argv[0].endswith("/bwrap")


@pytest.mark.parametrize("moment", [program_running, run_phase_started], ids=lambda f: f.__name__)
async def test_cancelled_job_is_killed(
    runner: JobRunner, job_watch: JobWatch, moment: Callable[[HostProcess], bool]
) -> None:
    """Cancelled (Genesis shutting down) while the program runs, or while its sandbox is still starting:
    nothing is left, not even the sandbox's init as a zombie for the host's init to collect."""
    for _ in range(5):  # the second moment is a race with asyncio's pipe set-up; a few rounds catch it
        task = asyncio.create_task(runner.run("import time\ntime.sleep(60)\n", "python"))
        deadline = time.monotonic() + LIMITS.wall_time_s
        while not any(moment(p) for p in job_watch.sample().values()):
            assert time.monotonic() < deadline and not task.done(), "the moment never came"
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.active == 0
        assert_nothing_left_running(job_watch)


MEMORY_HOGS = {
    "python": "hog = []\nwhile True:\n    hog.append(bytearray(10_000_000))\n",
    "javascript": "const hog = [];\nwhile (true) { hog.push(new Array(1e6).fill(1.5)); }\n",
    "elixir": (
        'chunk = String.duplicate("x", 10_000_000)\n'
        "Enum.reduce(1..1000, [], fn i, acc -> [chunk <> <<i::32>> | acc] end)\n"
    ),
}


@pytest.mark.parametrize("language", sorted(MEMORY_HOGS))
async def test_memory_hog_hits_the_memory_limit(runner: JobRunner, job_watch: JobWatch, language: str) -> None:
    require_language(language)
    outcome = await runner.run(MEMORY_HOGS[language], language)
    assert outcome.status is JobStatus.MEMORY_LIMIT, outcome
    assert_nothing_left_running(job_watch)


async def test_shared_memory_mapping_cannot_escape_the_python_limit(runner: JobRunner) -> None:
    code = "import mmap\nm = mmap.mmap(-1, 1 << 30)\nm[:: 1 << 12] = b'x' * (1 << 18)\n"
    outcome = await runner.run(code, "python")
    assert outcome.status is JobStatus.MEMORY_LIMIT, outcome


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[str]]]:
    """A TCP listener on the host's loopback; the list records every connection it accepts."""
    accepted: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, accepted
    finally:
        server.close()
        await server.wait_closed()


async def connect_and_wait_until_accepted(port: int, accepted: list[str]) -> str:
    """Connect from the host and wait (with a deadline) until the listener has accepted it; returns its name."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    name = str(writer.get_extra_info("sockname"))
    writer.close()
    deadline = time.monotonic() + 5
    while name not in accepted:
        assert time.monotonic() < deadline, f"the host's own connection {name} was never accepted"
        await asyncio.sleep(0.01)
    return name


async def test_network_is_unreachable(runner: JobRunner, listener: tuple[int, list[str]]) -> None:
    port, accepted = listener
    probe = await connect_and_wait_until_accepted(port, accepted)  # the host itself can connect
    code = (
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'leak')\n"
        "print('connected')\n"
    )
    outcome = await runner.run(code, "python")
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert "connected" not in outcome.stdout
    # bwrap's network namespace has only its own loopback: nothing listens there.
    assert "ConnectionRefusedError" in outcome.stderr or "Network is unreachable" in outcome.stderr
    # The listener accepts in arrival order: once a later connection of the host's is in, anything the job
    # had got through would be in before it.
    last = await connect_and_wait_until_accepted(port, accepted)
    assert accepted == [probe, last]


async def test_etc_shadow_is_not_readable(runner: JobRunner) -> None:
    python = await runner.run('print(open("/etc/shadow").read())\n', "python")
    assert python.status is JobStatus.RUNTIME_ERROR
    assert "FileNotFoundError" in python.stderr
    shell = await runner.run("cat /etc/shadow\nls /etc\n", "bash")
    assert "No such file or directory" in shell.stderr
    assert "shadow" not in shell.stdout and "passwd" not in shell.stdout
    if os.access("/etc/shadow", os.R_OK):
        root_entry = Path("/etc/shadow").read_text().splitlines()[0]
        assert root_entry not in python.stdout + python.stderr + shell.stdout + shell.stderr


@pytest.fixture
def secret_file() -> Iterator[tuple[str, Path]]:
    """A secret in a host file that the sandbox uid *could* read by permissions: only the mounts hide it."""
    secret = "genesis-test-secret-" + os.urandom(8).hex()
    directory = Path(tempfile.mkdtemp(prefix="genesis-secret-"))
    try:
        directory.chmod(0o755)
        path = directory / "service-secrets.env"
        path.write_text(f"API_KEY={secret}\n")
        path.chmod(0o644)
        yield secret, path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_service_secrets_are_invisible(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch, secret_file: tuple[str, Path]
) -> None:
    secret, path = secret_file
    monkeypatch.setenv("GENESIS_TEST_SECRET", secret)
    assert os.environ["GENESIS_TEST_SECRET"] == secret
    code = f"""\
import os
print(sorted(os.environ))
print(dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
        except OSError as exc:
            print(pid, exc)
for path in [{str(path)!r}, {str(path.parent)!r}, "/work", "/root", "/home"]:
    try:
        print(path, open(path).read() if os.path.isfile(path) else os.listdir(path))
    except OSError as exc:
        print(path, type(exc).__name__)
"""
    outcome = await runner.run(code, "python")
    assert outcome.status is JobStatus.OK, outcome
    assert secret not in outcome.stdout + outcome.stderr
    assert "GENESIS_TEST_SECRET" not in outcome.stdout
    assert f"{path} FileNotFoundError" in outcome.stdout
    assert "/work FileNotFoundError" in outcome.stdout and "/root FileNotFoundError" in outcome.stdout
    shell = await runner.run(f"env\ncat {path}\n", "bash")
    assert secret not in shell.stdout + shell.stderr


async def test_job_runs_unprivileged_in_its_own_namespaces(runner: JobRunner) -> None:
    code = """\
import os, socket
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print("uid", os.getuid(), "caps", status["CapEff"].strip(), "host", socket.gethostname(), "cwd", os.getcwd())
for target in ["/usr/evil", "/evil", "/dev/evil"]:
    try:
        open(target, "w")
        print("WROTE", target)
    except OSError as exc:
        print("refused", target, exc.strerror)
open("/tmp/ok.txt", "w").write("scratch space works")
print(open("/box/ok.txt").read())
"""
    outcome = await runner.run(code, "python")
    assert outcome.status is JobStatus.OK, outcome
    assert f"uid {SANDBOX_UID} caps 0000000000000000 host genesis cwd /box" in outcome.stdout
    assert "WROTE" not in outcome.stdout
    assert "scratch space works" in outcome.stdout


async def test_file_size_limit(runner: JobRunner) -> None:
    code = f'open("big.bin", "wb").write(b"x" * {LIMITS.max_file_bytes + MiB})\n'
    outcome = await runner.run(code, "python")
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert "File too large" in outcome.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_huge_output_is_truncated_without_exhausting_the_host(
    runner: JobRunner, job_watch: JobWatch, stream: str
) -> None:
    peak_rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n"
    outcome = await runner.run(code, "python")
    assert outcome.status is JobStatus.OUTPUT_TRUNCATED, outcome
    assert len(getattr(outcome, stream)) == LIMITS.max_output_bytes == 64 * KiB
    assert outcome.exit_code is None
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_before_kib
    assert grown_kib < 32 * 1024, f"host peak RSS grew by {grown_kib} KiB"
    assert_nothing_left_running(job_watch)
    # Killed for passing the cap, not by the wall clock: the sandbox says which.
    result = await sandbox.run_sandboxed(["python3", "-c", code], files={}, limits=LIMITS)
    assert result.output_truncated and not result.timed_out, result


# -- the pool ------------------------------------------------------------------------------------------


async def test_pool_never_runs_more_than_max_concurrent(sandbox_ready: None) -> None:
    pool = JobRunner(max_concurrent=2, limits=LIMITS)
    observed: list[int] = []

    async def watch() -> None:
        while True:
            observed.append(pool.active)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    jobs = [pool.run(f"import time\ntime.sleep(0.3)\nprint({i})\n", "python") for i in range(6)]
    outcomes = await asyncio.gather(*jobs)
    watcher.cancel()
    assert [o.stdout for o in outcomes] == [f"{i}\n" for i in range(6)]
    assert all(o.status is JobStatus.OK for o in outcomes)
    assert pool.peak_active == 2  # the runner's own counter: saturated, never exceeded
    assert max(observed) <= 2
    assert pool.active == 0


async def test_unsupported_language_is_rejected() -> None:
    with pytest.raises(UnsupportedLanguage, match="cobol"):
        await JobRunner(1).run("DISPLAY 'HI'.", "cobol")
    assert get_language("JS").name == "javascript"


def test_limits_and_outcomes_are_immutable_values() -> None:
    with pytest.raises(ValueError, match="cpu_time_s"):
        Limits(cpu_time_s=0)
    outcome = JobOutcome(status=JobStatus.OK, stdout="x")
    with pytest.raises(pydantic.ValidationError):
        outcome.status = JobStatus.TIMEOUT  # type: ignore[misc]
    # the contract's statuses; "error" (Genesis could not run the job at all) is the service's, not the runner's
    assert {s.value for s in JobStatus} - {"error"} == {
        "ok",
        "syntax_error",
        "lint",
        "runtime_error",
        "timeout",
        "memory_limit",
        "output_truncated",
    }


GREETINGS = {
    "python": "print('hello')",
    "javascript": "console.log('hello')",
    "bash": "echo hello",
    "elixir": 'IO.puts("hello")',
}


async def test_every_language_runs_without_proc(monkeypatch):
    """Where a container runtime forbids a fresh /proc (Kubernetes masks it), jobs run without one."""
    monkeypatch.setenv(sandbox.PROC_ENV, "off")
    runner = JobRunner(2)
    outcomes = await asyncio.gather(*(runner.run(code, language) for language, code in GREETINGS.items()))
    for language, outcome in zip(GREETINGS, outcomes, strict=True):
        assert (outcome.status, outcome.stdout.strip()) == (JobStatus.OK, "hello"), (language, outcome)
    listing = await runner.run("import os; print(os.path.exists('/proc/self'))", "python")
    assert listing.stdout.strip() == "False"


async def test_a_refused_proc_mount_falls_back_once_and_is_remembered(monkeypatch):
    wrapper_dir = Path(tempfile.mkdtemp(prefix="fake-bwrap-"))
    wrapper_dir.chmod(0o755)
    wrapper = wrapper_dir / "bwrap"
    real = sandbox.find_bwrap()
    calls = wrapper_dir / "calls"
    calls.write_text("")
    calls.chmod(0o666)
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        # What a default container does to bwrap: no fresh /proc, and its own /proc/sys is read-only.
        'case " $* " in *" --proc "*) echo "bwrap: Can\'t mount proc on /newroot/proc: Operation not permitted" >&2; '
        "exit 1;; esac\n"
        'case " $* " in *" --disable-userns "*) echo "bwrap: cannot open /proc/sys/user/max_user_namespaces: '
        'Read-only file system" >&2; exit 1;; esac\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: str(wrapper))
    monkeypatch.setattr(sandbox, "_proc_refused", False)
    monkeypatch.delenv(sandbox.PROC_ENV, raising=False)
    try:
        first = await JobRunner(1).run("print(1)", "python")
        second = await JobRunner(1).run("print(2)", "python")
        assert (first.status, first.stdout, second.stdout) == (JobStatus.OK, "1\n", "2\n")
        attempts = calls.read_text().splitlines()
        assert sum(" --proc " in f" {line} " for line in attempts) == 1  # refused once, then remembered
        monkeypatch.setattr(sandbox, "_proc_refused", False)
        monkeypatch.setenv(sandbox.PROC_ENV, "on")  # insisting on /proc turns the refusal into an error
        with pytest.raises(sandbox.SandboxError, match="mount proc"):
            await JobRunner(1).run("print(3)", "python")
    finally:
        shutil.rmtree(wrapper_dir, ignore_errors=True)


NEW_USER_NAMESPACE = """
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
result = libc.unshare(0x10000000)  # CLONE_NEWUSER
print("unshare", result, os.strerror(ctypes.get_errno()) if result else "")
threads = [threading.Thread(target=lambda: None) for _ in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
pid = os.fork()
if pid == 0: os._exit(7)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.parametrize("proc_mode", ["auto", "off"])
async def test_jobs_cannot_create_user_namespaces_with_or_without_proc(monkeypatch, proc_mode: str) -> None:
    """Without its own /proc (in a Pod) bwrap cannot --disable-userns; the seccomp filter refuses it anyway,
    while threads (clone3 -> ENOSYS -> glibc's clone fallback) and fork keep working."""
    monkeypatch.setenv(sandbox.PROC_ENV, proc_mode)
    outcome = await JobRunner(1).run(NEW_USER_NAMESPACE, "python")
    assert outcome.status == JobStatus.OK, outcome
    assert outcome.stdout.splitlines() == ["unshare -1 Operation not permitted", "child 7"]


# -- one sandbox, its phases one after another --------------------------------------------------------


async def test_each_phase_of_a_sandbox_is_reported_on_its_own(sandbox_ready: None, job_watch: JobWatch) -> None:
    """Outputs without a final newline, exit codes, an address-space limit and an environment of one phase
    alone: nothing of one phase leaks into another's result, and the later phases see the same /box."""
    phases = [
        sandbox.Phase("first", ["sh", "-c", "printf out1; printf err1 >&2; echo made > made; exit 3"]),
        sandbox.Phase("second", ["sh", "-c", 'printf "%s %s" "$(ulimit -v)" "$ONLY"'], {"ONLY": "x y"}, 64 * MiB),
        sandbox.Phase("third", ["sh", "-c", 'cat made; printf "[%s] %s" "${ONLY-unset}" "$(ulimit -v)" >&2']),
    ]
    async with sandbox.JobSandbox(phases, files={}, limits=LIMITS) as box:
        results = [await box.run_next() for _ in phases]
    got = [(r.exit_code, r.stdout, r.stderr, r.timed_out, r.output_truncated) for r in results]
    assert got == [
        (3, b"out1", b"err1", False, False),
        (0, b"65536 x y", b"", False, False),
        (0, b"made\n", b"[unset] unlimited", False, False),
    ]
    assert_nothing_left_running(job_watch)


async def test_a_phase_printing_a_marker_of_its_own_stays_in_its_output(sandbox_ready: None) -> None:
    """A phase that prints what looks like the init's end-of-phase marker (any nonce but the sandbox's
    own, which it cannot know) neither ends its phase early nor writes the next one's output."""
    fake = "\\n0123456789abcdef0123456789abcdef 0\\n"
    phases = [
        sandbox.Phase("first", ["sh", "-c", f"printf '{fake}'; printf '{fake}' >&2; sleep 0.2; printf after"]),
        sandbox.Phase("second", ["sh", "-c", "printf second"]),
    ]
    async with sandbox.JobSandbox(phases, files={}, limits=LIMITS) as box:
        first, second = await box.run_next(), await box.run_next()
    marker = b"\n0123456789abcdef0123456789abcdef 0\n"
    assert (first.stdout, first.stderr, second.stdout) == (marker + b"after", marker, b"second")


async def test_a_program_reads_nothing_on_stdin(runner: JobRunner) -> None:
    """The init reads the host's go-aheads on its stdin; the job's programs get /dev/null there."""
    outcome = await runner.run("import sys\nprint(repr(sys.stdin.read()))\n", "python")
    assert (outcome.status, outcome.stdout) == (JobStatus.OK, "''\n"), outcome


def test_phase_output_is_split_at_the_marker_however_the_pipe_cuts_it() -> None:
    """The marker and its status may arrive a byte at a time; a status line that is not one stays output."""
    nonce = b"ab" * 16
    data = b"x\n" + b"\n" + nonce + b" 7\n" + b"y" + b"\n" + nonce + b" no\nz" + b"\n" + nonce + b" 0\n" + b"last"

    async def split(chunk: int) -> tuple[list[bytes], list[int | None]]:
        stream = phase_output.PhasedStream(3, 1024, nonce, True, lambda: None)
        reader = asyncio.StreamReader()
        for at in range(0, len(data), chunk):
            reader.feed_data(data[at : at + chunk])
        reader.feed_eof()
        await stream.drain(reader)
        return [bytes(c.data) for c in stream.captures], [f.result() for f in stream.ended]

    expected = ([b"x\n", b"y\n" + nonce + b" no\nz", b"last"], [7, 0, None])
    for chunk in (1, 2, 3, 7, len(data)):
        assert asyncio.run(split(chunk)) == expected, chunk
