"""Genesis's job latency per language beside the bare interpreter running the same program, with the goals.

    .venv/bin/python bench/genesis_bench.py [--jobs 10] [--samples 7] [--languages python,bash,...]

A sample is the mean latency of `--jobs` trivial jobs run one at a time through JobRunner (syntax check,
lint where the language has a linter, run: one sandbox per job), or of the same program spawned bare
(`/usr/bin/python3 main.py`, `node main.js`, `bash main.sh`, `elixir main.exs`, from a file, as the job
runs it). Sandboxed and bare are interleaved per language (sandboxed, bare, sandboxed, bare ...) after a
warm-up round of each; the ratio is taken per round from the two runs side by side. The goal (issue 14):
python <= 2x the bare interpreter, javascript and elixir <= 1.3x, bash <= 5x; or, where the bare run is
under 5 ms, at most 10 ms above it. Each job's own phase timings (timings_ms) are printed too.
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

from singularity_stack.genesis.runner import JobRunner


@dataclass(frozen=True)
class Case:
    language: str
    source_name: str
    code: str
    bare_argv: tuple[str, ...]  # run in a directory holding the source, as the job runs it
    goal_ratio: float


CASES = [
    Case("python", "main.py", "print(1)\n", ("/usr/bin/python3", "main.py"), 2.0),
    Case("javascript", "main.js", "console.log(1);\n", ("/usr/bin/node", "main.js"), 1.3),
    Case("bash", "main.sh", "echo 1\n", ("/usr/bin/bash", "main.sh"), 5.0),
    Case("elixir", "main.exs", "IO.puts(1)\n", ("/usr/bin/elixir", "main.exs"), 1.3),
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
    with open(os.path.join(workdir, case.source_name), "w") as source:
        source.write(case.code)

    async def sandboxed_job() -> None:
        outcome = await runner.run(case.code, case.language)
        assert outcome.status == "ok" and outcome.stdout == "1\n", outcome
        for phase, taken in outcome.timings_ms.items():
            phases.setdefault(phase, []).append(taken)

    async def bare_run() -> None:
        process = await asyncio.create_subprocess_exec(
            *case.bare_argv, cwd=workdir, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
        )
        stdout, _ = await process.communicate()
        assert process.returncode == 0 and stdout == b"1\n", (process.returncode, stdout)

    modes = {"sandboxed": mean_ms_of(jobs, sandboxed_job), "bare": mean_ms_of(jobs, bare_run)}
    results = await interleave_async(modes, samples=samples, warmup=1)
    sandboxed, bare = results["sandboxed"], results["bare"]
    overhead = ratio(sandboxed, bare, "job / bare")
    print(f"{case.language}:")
    print(f"  job, one at a time            {sandboxed.format('ms', '{:.1f}')}")
    print(f"  bare {' '.join(case.bare_argv):<24} {bare.format('ms', '{:.1f}')}")
    print(f"  job / bare, per round         {overhead.format('x', '{:.2f}')}")
    split = ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in phases.items())
    print(f"  the job's phases (median ms)  {split}")
    print(f"  {verdict(case, sandboxed, bare, overhead)}", flush=True)


async def measure(languages: list[str], jobs: int, samples: int) -> None:
    print(f"Genesis job latency beside the bare interpreter; {samples} samples of {jobs} jobs, one at a time, ")
    print(f"interleaved after a warm-up round; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as workdir:
        for case in CASES:
            if case.language not in languages:
                continue
            if shutil.which(case.bare_argv[0]) is None:
                print(f"{case.language}: skipped, {case.bare_argv[0]} is not installed")
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
