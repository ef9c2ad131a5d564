"""The bounded job pool: validate (syntax, lint) and run code, at most `max_concurrent` jobs at once.

A job is up to three phases, run one after another in one fresh sandbox (sandbox.JobSandbox), each under
the limits a sandbox of its own would have, each with its own result and timing (`timings_ms`: one entry
per phase that ran, and `total`):
1. syntax check: a failure stops the job with `syntax_error` and the checker's message on stderr
   (source larger than `Limits.max_file_bytes` is refused the same way, without a sandbox). Where the
   interpreter compiles the whole file before it runs any of it (python, javascript, elixir) and the job
   runs, the run is the check: code that does not compile runs none of it. The separate check then runs
   only when the run (or the linter) failed, in a fresh sandbox on the source as it was, and decides as it
   would have first; a program that prints a compiler's words is still a runtime error;
2. lint, when the language has a linter: findings land in `lint` and never stop the job. A linter that
   cannot run (not installed, out of the job account's reach, crashed, unreadable output) stops the job
   with `error` and the reason in stderr: the requester must never take that for clean code;
3. run (unless `run=False`).

The status names the most significant thing that happened. With `run=True` that is the run's outcome,
so a program with lint findings that runs fine is `ok` (findings in `lint`). With `run=False` the
status is `lint` when there are findings and `ok` when the code is clean.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import BaseModel, ConfigDict, Field

from singularity_stack import contract as c
from singularity_stack.contract import JobStatus
from singularity_stack.genesis.languages import LANGUAGES, LintOutputError, Toolchain, get_language
from singularity_stack.genesis.sandbox import JobSandbox, Limits, Phase, SandboxError, SandboxResult

log = logging.getLogger(__name__)


class JobOutcome(BaseModel):
    """The result of one job. stdout/stderr are capped (`output_truncated` says the cap was hit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: JobStatus
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None  # None when the program never ran or was killed by the sandbox
    lint: list[str] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)  # syntax / lint / run / total


NUL_STANDIN = "\u2400"  # SYMBOL FOR NULL: PostgreSQL's text and jsonb refuse U+0000 itself


def _text(data: bytes) -> str:
    """A job's bytes as text that any queue message and database can hold.

    Caps cut at a byte count, possibly mid-character, and a job may print anything: invalid UTF-8
    becomes U+FFFD, NUL becomes a visible stand-in; every other character comes back as it was.
    """
    return data.decode("utf-8", errors="replace").replace("\x00", NUL_STANDIN)


def classify(result: SandboxResult, language: Toolchain) -> JobStatus:
    """Status of a finished sandboxed process, most specific cause first."""
    if result.output_truncated:
        return JobStatus.OUTPUT_TRUNCATED
    if result.memory_limit_hit:  # even if the job survived losing a process to it
        return JobStatus.MEMORY_LIMIT
    if result.timed_out or result.hit_cpu_limit:
        return JobStatus.TIMEOUT
    if result.exit_code == 0:
        return JobStatus.OK
    if language.ran_out_of_memory(_text(result.stderr)):
        return JobStatus.MEMORY_LIMIT
    return JobStatus.RUNTIME_ERROR


class LintFailed(Exception):
    """The language's linter could not lint the code; the message says why, in one line."""


class JobRunner:
    """Runs jobs concurrently, never more than `max_concurrent` at a time (an asyncio semaphore).

    `active` and `peak_active` count jobs holding a slot, so callers and tests can observe the bound.
    """

    def __init__(self, max_concurrent: int = 4, limits: Limits | None = None) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.limits = limits or Limits()
        self._slots = asyncio.Semaphore(max_concurrent)
        self.active = 0
        self.peak_active = 0

    async def run(self, code: str, language: str, run: bool = True) -> JobOutcome:
        """Validate `code` and, if `run`, execute it. Raises UnsupportedLanguage or SandboxError."""
        lang = get_language(language)  # fail fast, before waiting for a slot
        async with self._slots:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            try:
                return await _Job(lang, code, self.limits).execute(run)
            finally:
                self.active -= 1


class _Job:
    """One job's phases, run one after another in one sandbox, and the timings they accumulate."""

    def __init__(self, language: Toolchain, code: str, limits: Limits) -> None:
        self.language = language
        self.files = {language.source_name: code.encode("utf-8")}
        self.limits = limits
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    def _syntax_phase(self) -> Phase:
        lang = self.language
        return Phase("syntax", lang.syntax_argv, lang.env, lang.address_space_bytes(self.limits))

    def _run_phase(self) -> Phase:
        lang = self.language
        return Phase("run", lang.run_argv(self.limits), lang.env, lang.address_space_bytes(self.limits))

    def _lint_phase(self) -> tuple[Phase, dict[str, str]] | LintFailed | None:
        """The lint phase and the tool it mounts; LintFailed when the linter cannot run; None without one."""
        linter = self.language.linter
        if linter is None:
            return None
        tool = linter.prepared()
        if tool.path is None:
            return LintFailed(tool.problem)
        return Phase("lint", linter.argv(self.language.source_name), linter.env), {linter.tool: tool.path}

    @property
    def _linter_name(self) -> str:
        return self.language.linter.tool if self.language.linter else ""

    async def execute(self, run: bool) -> JobOutcome:
        source_bytes = len(self.files[self.language.source_name])
        if source_bytes > self.limits.max_file_bytes:
            # It would not even fit the sandbox's workdir; refuse it as invalid input, not a sandbox fault.
            message = f"source is {source_bytes} bytes; the limit is {self.limits.max_file_bytes} bytes\n"
            return JobOutcome(status=JobStatus.SYNTAX_ERROR, stderr=message, timings_ms={"total": 0.0})
        if run and self.language.compiles_before_running:
            return await self._checked_by_the_run()
        lint = self._lint_phase()
        phases, tools = [self._syntax_phase()], {}
        if isinstance(lint, tuple):
            phases.append(lint[0])
            tools = lint[1]
        if run and not isinstance(lint, LintFailed):
            phases.append(self._run_phase())
        async with JobSandbox(phases, files=self.files, limits=self.limits, tools=tools) as box:
            try:
                checked = await self._timed(box)
            except SandboxError as exc:
                if not tools:
                    raise
                # The linter's mount may be what bwrap refused: the job's result is then the linter's failure.
                failure = LintFailed(f"{self._linter_name} could not run in the sandbox: {exc}")
                return await self._syntax_decides(failure)
            status = classify(checked, self.language)
            if status is not JobStatus.OK:
                return self._syntax_failed(status, checked)
            try:
                if isinstance(lint, LintFailed):
                    raise lint
                findings = self._findings(await self._timed(box)) if tools else []
            except LintFailed as failure:
                return self._lint_failed(failure)
            if not run:
                status = JobStatus.LINT if findings else JobStatus.OK
                return self._outcome(status, None, exit_code=None, lint=findings)
            ran = await self._timed(box)
        return self._outcome(classify(ran, self.language), ran, exit_code=ran.exit_code, lint=findings)

    async def _checked_by_the_run(self) -> JobOutcome:
        """Lint and run, with the interpreter's own compilation as the syntax check: it compiles the whole file
        before it runs any of it, so code that does not compile never runs. Only a run that did not end `ok`
        may have been a syntax error; then the separate check, in a fresh sandbox on the source as it was,
        decides, exactly as it would have first (a program printing a compiler's words is still its own)."""
        lint = self._lint_phase()
        if isinstance(lint, LintFailed):
            return await self._syntax_decides(lint)
        phases, tools = [self._run_phase()], {}
        if lint is not None:
            phases.insert(0, lint[0])
            tools = lint[1]
        failure: LintFailed | None = None
        async with JobSandbox(phases, files=self.files, limits=self.limits, tools=tools) as box:
            findings: list[str] = []
            if tools:
                try:
                    findings = self._findings(await self._timed(box))
                except SandboxError as exc:
                    failure = LintFailed(f"{self._linter_name} could not run in the sandbox: {exc}")
                except LintFailed as lint_failure:
                    failure = lint_failure
            if failure is None:
                ran = await self._timed(box)
        if failure is not None:
            return await self._syntax_decides(failure)
        status = classify(ran, self.language)
        if status is not JobStatus.OK:
            checked = await self._syntax_check()
            if (checked_status := classify(checked, self.language)) is not JobStatus.OK:
                return self._syntax_failed(checked_status, checked)
        return self._outcome(status, ran, exit_code=ran.exit_code, lint=findings)

    async def _syntax_check(self) -> SandboxResult:
        async with JobSandbox([self._syntax_phase()], files=self.files, limits=self.limits) as box:
            return await self._timed(box)

    async def _syntax_decides(self, failure: LintFailed) -> JobOutcome:
        """The job as it is when its linter cannot run: the syntax check alone decides before the failure."""
        checked = await self._syntax_check()
        status = classify(checked, self.language)
        if status is not JobStatus.OK:
            return self._syntax_failed(status, checked)
        return self._lint_failed(failure)

    def _syntax_failed(self, status: JobStatus, checked: SandboxResult) -> JobOutcome:
        # The checker never runs user code, so any failure other than our limits is the code's syntax.
        if status is JobStatus.RUNTIME_ERROR:
            status = JobStatus.SYNTAX_ERROR
        return self._outcome(status, checked, exit_code=None, lint=[])

    def _lint_failed(self, failure: LintFailed) -> JobOutcome:
        log.error("lint failed", extra={"language": self.language.name.value, "error": str(failure)})
        return JobOutcome(status=JobStatus.ERROR, stderr=f"lint: {failure}\n", timings_ms=self._timings())

    async def _timed(self, box: JobSandbox) -> SandboxResult:
        """The sandbox's next phase, its time recorded under its name (phase 0's includes the set-up)."""
        phase = box.phases[box.done]
        started = time.perf_counter()
        try:
            return await box.run_next()
        finally:
            self.timings[phase.name] = round((time.perf_counter() - started) * 1000, 1)

    async def lint(self) -> list[str]:
        """Findings of the language's linter, in a sandbox of its own; LintFailed when it cannot run."""
        lint = self._lint_phase()
        if lint is None:
            return []
        if isinstance(lint, LintFailed):
            raise lint
        phase, tools = lint
        try:
            async with JobSandbox([phase], files=self.files, limits=self.limits, tools=tools) as box:
                result = await self._timed(box)
        except SandboxError as exc:
            raise LintFailed(f"{self._linter_name} could not run in the sandbox: {exc}") from None
        return self._findings(result)

    def _findings(self, result: SandboxResult) -> list[str]:
        """The linter's findings from its phase's result; LintFailed when it did not lint."""
        linter = self.language.linter
        assert linter is not None
        status = classify(result, self.language)
        stderr = _text(result.stderr).strip()[:500]
        # Both linters: 0 clean, 1 findings, anything else (or a limit hit) a failure.
        if result.exit_code not in (0, 1) or status not in (JobStatus.OK, JobStatus.RUNTIME_ERROR):
            raise LintFailed(f"{linter.tool} failed ({status.value}, exit {result.exit_code}): {stderr}")
        try:
            findings = linter.parse(_text(result.stdout))
        except LintOutputError as error:
            raise LintFailed(f"{linter.tool} (exit {result.exit_code}): {error}; stderr: {stderr}") from None
        if result.exit_code == 1 and not findings:
            raise LintFailed(f"{linter.tool} exited 1 without reporting a finding: {stderr}")
        return findings

    def _outcome(
        self, status: JobStatus, result: SandboxResult | None, *, exit_code: int | None, lint: list[str]
    ) -> JobOutcome:
        return JobOutcome(
            status=status,
            stdout=_text(result.stdout) if result else "",
            stderr=_text(result.stderr) if result else "",
            exit_code=exit_code,
            lint=lint,
            timings_ms=self._timings(),
        )

    def _timings(self) -> dict[str, float]:
        self.timings["total"] = round((time.perf_counter() - self.started) * 1000, 1)
        return dict(self.timings)


async def probe_linters(limits: Limits | None = None) -> dict[c.Language, tuple[bool, str]]:
    """Each linted language -> (works, which tool at which path | why not): whether its linter lints a trivial
    program here exactly as a job's is linted (the tool as prepared for the job's account, in the sandbox),
    so a linter out of the account's reach is found at start, not at the first job."""
    results: dict[c.Language, tuple[bool, str]] = {}
    for name, language in LANGUAGES.items():
        if language.linter is None:
            continue
        try:
            await _Job(language, "", limits or Limits()).lint()
            results[name] = (True, f"{language.linter.tool} at {language.linter.prepared().note}")
        except LintFailed as failure:
            results[name] = (False, str(failure))
    return results
