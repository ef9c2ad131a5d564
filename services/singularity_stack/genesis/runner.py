"""The bounded job pool: validate (syntax, lint) and run code, at most `max_concurrent` jobs at once.

A job is three sandboxed phases, each a fresh sandbox under the same limits:
1. syntax check: a failure stops the job with `syntax_error` and the checker's message on stderr
   (source larger than `Limits.max_file_bytes` is refused the same way, without a sandbox);
2. lint, when the language has a linter installed: findings land in `lint` and never stop the job;
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

from singularity_stack.contract import JobStatus
from singularity_stack.genesis.languages import Toolchain, get_language
from singularity_stack.genesis.sandbox import Limits, SandboxError, SandboxResult, run_sandboxed

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
    """One job's phases and the timings they accumulate."""

    def __init__(self, language: Toolchain, code: str, limits: Limits) -> None:
        self.language = language
        self.files = {language.source_name: code.encode("utf-8")}
        self.limits = limits
        self.timings: dict[str, float] = {}
        self.started = time.perf_counter()

    async def execute(self, run: bool) -> JobOutcome:
        source_bytes = len(self.files[self.language.source_name])
        if source_bytes > self.limits.max_file_bytes:
            # It would not even fit the sandbox's workdir; refuse it as invalid input, not a sandbox fault.
            message = f"source is {source_bytes} bytes; the limit is {self.limits.max_file_bytes} bytes\n"
            return JobOutcome(status=JobStatus.SYNTAX_ERROR, stderr=message, timings_ms={"total": 0.0})
        checked = await self._sandboxed("syntax", self.language.syntax_argv)
        status = classify(checked, self.language)
        if status is not JobStatus.OK:
            # The checker never runs user code, so any failure other than our limits is the code's syntax.
            if status is JobStatus.RUNTIME_ERROR:
                status = JobStatus.SYNTAX_ERROR
            return self._outcome(status, checked, exit_code=None, lint=[])
        findings = await self._lint()
        if not run:
            status = JobStatus.LINT if findings else JobStatus.OK
            return self._outcome(status, None, exit_code=None, lint=findings)
        ran = await self._sandboxed("run", self.language.run_argv(self.limits))
        return self._outcome(classify(ran, self.language), ran, exit_code=ran.exit_code, lint=findings)

    async def _sandboxed(self, phase: str, argv: tuple[str, ...]) -> SandboxResult:
        """Run one phase (syntax check or the program itself) with the language's environment."""
        started = time.perf_counter()
        try:
            return await run_sandboxed(
                argv,
                files=self.files,
                limits=self.limits,
                env=self.language.env,
                address_space_bytes=self.language.address_space_bytes(self.limits),
            )
        finally:
            self.timings[phase] = round((time.perf_counter() - started) * 1000, 1)

    async def _lint(self) -> list[str]:
        """Findings of the language's linter; an absent or broken linter only costs the findings."""
        linter = self.language.linter
        tool = linter.locate() if linter else None
        if linter is None or tool is None:
            return []
        started = time.perf_counter()
        try:
            result = await run_sandboxed(
                linter.argv(self.language.source_name),
                files=self.files,
                limits=self.limits,
                env=linter.env,
                tools={linter.tool: tool},
            )
        except SandboxError as exc:
            log.warning("%s could not run in the sandbox, skipping lint: %s", linter.tool, exc)
            return []
        finally:
            self.timings["lint"] = round((time.perf_counter() - started) * 1000, 1)
        if result.exit_code not in (0, 1):  # both linters: 0 clean, 1 findings, anything else a failure
            log.warning("%s failed (exit %s): %s", linter.tool, result.exit_code, _text(result.stderr)[:500])
            return []
        return linter.parse(_text(result.stdout))

    def _outcome(
        self, status: JobStatus, result: SandboxResult | None, *, exit_code: int | None, lint: list[str]
    ) -> JobOutcome:
        self.timings["total"] = round((time.perf_counter() - self.started) * 1000, 1)
        return JobOutcome(
            status=status,
            stdout=_text(result.stdout) if result else "",
            stderr=_text(result.stderr) if result else "",
            exit_code=exit_code,
            lint=lint,
            timings_ms=dict(self.timings),
        )
