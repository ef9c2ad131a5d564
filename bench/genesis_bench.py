"""Genesis's job latency per language beside the bare interpreter running the same program, with the goals.

    .venv/bin/python bench/genesis_bench.py [--jobs 10] [--samples 7] [--languages python,bash,...]

A sample is the mean latency of `--jobs` trivial jobs run one at a time through JobRunner (one sandbox per
job: syntax check where the run is not one, lint where the language has a linter, run), or of the same program
spawned bare (`/usr/bin/python3 -u main.py`, `node --max-old-space-size=192 main.js`, `bash main.sh`, `elixir
main.exs`, from a file, as the job runs it, with the job's flags and environment). Sandboxed and bare are
interleaved per language (sandboxed, bare, sandboxed, bare ...) after a warm-up round of each; the ratio is
taken per round from the two runs side by side. The goal (issue 14): python <= 2x the bare interpreter,
javascript and elixir <= 1.3x, bash <= 5x; or, where the bare run is under 5 ms, at most 10 ms above it. Each
job's own phase timings (timings_ms) are printed too, and first a sandbox running `true` beside bwrap alone
with the same namespaces and mounts (what Genesis adds to bubblewrap's own set-up).
Needs root or unprivileged user namespaces, bubblewrap and the interpreters (a missing one is skipped, said).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from samples import Samples, interleave_async, ratio

from singularity_stack.genesis.languages import Toolchain, get_language
from singularity_stack.genesis.runner import JobRunner
from singularity_stack.genesis.sandbox import SANDBOX_PATH, Limits, find_bwrap, run_sandboxed


@dataclass(frozen=True)
class Case:
    language: str
    code: str
    goal_ratio: float

    @property
    def toolchain(self) -> Toolchain:
        return get_language(self.language)

    def bare_argv(self) -> tuple[str, ...]:
        """The job's own run command (flags included), from /usr/bin, run in a directory holding the source."""
        program, *args = self.toolchain.run_argv(Limits())
        return (f"/usr/bin/{program}", *args)

    def bare_env(self, workdir: str) -> dict[str, str]:
        """The job's environment (sandbox.py's base, plus the language's): the sandbox is the one difference."""
        base = {"PATH": SANDBOX_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        return {**base, **self.toolchain.env}


CASES = [
    Case("python", "print(1)\n", 2.0),
    Case("javascript", "console.log(1);\n", 1.3),
    Case("bash", "echo 1\n", 5.0),
    Case("elixir", "IO.puts(1)\n", 1.3),
]
SMALL_BARE_MS = 5.0  # under this, the goal is an absolute one: at most 10 ms above the bare run
SMALL_ALLOWANCE_MS = 10.0


def mean_ms_of(jobs: int, one: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[float]]:
    async def measure() -> float:
        started = time.perf_counter()
        for _ in range(jobs):
            await one()
        return (time.perf_counter() - started) * 1000 / jobs

    return measure


async def run_bare(case: Case, workdir: str) -> None:
    """The bare interpreter on the same file, with the job's flags and environment; it must print 1."""
    process = await asyncio.create_subprocess_exec(
        *case.bare_argv(),
        cwd=workdir,
        env=case.bare_env(workdir),
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0 and stdout == b"1\n", (process.returncode, stdout)


def verdict(case: Case, sandboxed: Samples, bare: Samples, overhead: Samples) -> str:
    if bare.median < SMALL_BARE_MS:
        above = Samples("above", [s - b for s, b in zip(sandboxed.values, bare.values, strict=True)])
        met = above.median <= SMALL_ALLOWANCE_MS
        figure = f"{above.median:.1f} ms above the bare run (per round, min-max {above.min:.1f}-{above.max:.1f})"
        target = f"bare under {SMALL_BARE_MS:.0f} ms: at most {SMALL_ALLOWANCE_MS:.0f} ms above it"
    else:
        met = overhead.median <= case.goal_ratio
        figure = f"{overhead.median:.2f}x"
        target = f"<= {case.goal_ratio:g}x the bare interpreter"
    return f"goal {target} — {'met' if met else 'MISSED'}: {figure}"


async def measure_case(case: Case, jobs: int, samples: int, workdir: str) -> None:
    runner = JobRunner(max_concurrent=1)
    phases: dict[str, list[float]] = {}
    with open(os.path.join(workdir, case.toolchain.source_name), "w") as source:
        source.write(case.code)

    async def sandboxed_job() -> None:
        outcome = await runner.run(case.code, case.language)
        assert outcome.status == "ok" and outcome.stdout == "1\n", outcome
        for phase, taken in outcome.timings_ms.items():
            phases.setdefault(phase, []).append(taken)

    modes = {"sandboxed": mean_ms_of(jobs, sandboxed_job), "bare": mean_ms_of(jobs, lambda: run_bare(case, workdir))}
    results = await interleave_async(modes, samples=samples, warmup=1)
    sandboxed, bare = results["sandboxed"], results["bare"]
    overhead = ratio(sandboxed, bare, "job / bare")
    print(f"{case.language}:")
    print(f"  job, one at a time            {sandboxed.format('ms', '{:.1f}')}")
    print(f"  bare {' '.join(case.bare_argv())}")
    print(f"    (the job's env)             {bare.format('ms', '{:.1f}')}")
    print(f"  job / bare, per round         {overhead.format('x', '{:.2f}')}")
    split = ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in phases.items())
    print(f"  the job's phases (median ms)  {split}")
    print(f"  {verdict(case, sandboxed, bare, overhead)}", flush=True)


async def setup_cost(jobs: int, samples: int) -> None:
    """A sandbox that runs `true` (cgroup, launcher, setpriv, bwrap, init, teardown) beside bwrap alone with
    the same namespaces and mounts of /usr, /proc and /dev: what Genesis adds to bubblewrap's own cost."""
    bwrap = find_bwrap()
    alone = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/lib", "/lib64"):
        if os.path.islink(link):
            alone += ["--symlink", os.readlink(link), link]
    alone += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/box", "--chdir", "/box", "true"]

    async def sandboxed() -> None:
        result = await run_sandboxed(["true"], files={}, limits=Limits())
        assert result.exit_code == 0, result

    async def bwrap_alone() -> None:
        process = await asyncio.create_subprocess_exec(*alone, stdin=asyncio.subprocess.DEVNULL)
        assert await process.wait() == 0

    modes = {"sandbox": mean_ms_of(jobs, sandboxed), "bwrap": mean_ms_of(jobs, bwrap_alone)}
    results = await interleave_async(modes, samples=samples, warmup=1)
    added = Samples("added", [s - b for s, b in zip(results["sandbox"].values, results["bwrap"].values, strict=True)])
    print("set-up, a sandbox running `true`:")
    print(f"  run_sandboxed(['true'])       {results['sandbox'].format('ms', '{:.1f}')}")
    print(f"  bwrap alone (same namespaces) {results['bwrap'].format('ms', '{:.1f}')}")
    print(f"  Genesis's part, per round     {added.format('ms', '{:.1f}')}", flush=True)


async def measure(languages: list[str], jobs: int, samples: int) -> None:
    print(f"Genesis job latency beside the bare interpreter; {samples} samples of {jobs} jobs, one at a time, ")
    print(f"interleaved after a warm-up round; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    await setup_cost(jobs, samples)
    with tempfile.TemporaryDirectory() as workdir:
        for case in CASES:
            if case.language not in languages:
                continue
            if shutil.which(case.bare_argv()[0]) is None:
                print(f"{case.language}: skipped, {case.bare_argv()[0]} is not installed")
                continue
            # The BEAM takes about half a second to start, bare or not: fewer jobs per sample say as much.
            await measure_case(case, max(2, jobs // 4) if case.language == "elixir" else jobs, samples, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10, help="jobs (and bare runs) per sample")
    parser.add_argument("--samples", type=int, default=7, help="measured rounds per language")
    parser.add_argument("--languages", default=",".join(case.language for case in CASES))
    args = parser.parse_args()
    asyncio.run(measure(args.languages.split(","), args.jobs, args.samples))


if __name__ == "__main__":
    main()
