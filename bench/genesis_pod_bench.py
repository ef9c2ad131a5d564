"""Genesis's job latency in each sandbox mode, side by side in one run: a trivial python job (syntax check,
lint, run) in a job Pod on the local node (`sandbox: pod`: PodRunner, as Genesis runs it), in bubblewrap
(`sandbox: bubblewrap`: JobRunner, on the node's host), and the same program run bare (`/usr/bin/python3 -u
main.py` from a file, with the job's environment, as bench/genesis_bench.py runs it).

    flock /tmp/local-node.lock .venv/bin/python bench/genesis_pod_bench.py [--samples 5] [--jobs 3]

Needs root (the local node of singularity_stack_testing.kube.localnode, which conflicts with any other on
the machine: hence the lock) and bubblewrap. Builds and imports the images (scripts/build-images.sh, from
its layer cache after the first run), starts the node, makes a namespace for the job Pods (no stack, no
operator: the Pod is the one Genesis makes, from the same manifest), then interleaves the three modes (pod,
bubblewrap, bare, pod, ...) after a warm-up round of each; a sample is the mean of `--jobs` jobs run one at a
time, and each ratio is taken per round from the runs side by side (bench/samples.py). The node's own
start-up and teardown are one run each, reported, not compared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from genesis_bench import CASES, mean_ms_of, run_bare
from kubernetes import client, config
from samples import interleave_async, ratio

from singularity_stack.genesis.pod_sandbox import PodRunner, PodSandboxSettings
from singularity_stack.genesis.runner import JobOutcome, JobRunner
from singularity_stack_testing.cluster import IMAGE, TIMINGS, Cluster, wait_until
from singularity_stack_testing.providers import local_cluster

NAMESPACE = "genesis-pod-bench"
[PYTHON] = [case for case in CASES if case.language == "python"]


def pod_runner(cluster: Cluster) -> PodRunner:
    """PodRunner with the settings the operator gives Genesis in `sandbox: pod` (the stack's image)."""
    cluster.kubectl("create", "namespace", NAMESPACE)
    # The ServiceAccount admission plugin refuses Pods until the namespace's default account exists.
    account = ("get", "serviceaccount", "default", "-n", NAMESPACE)
    wait_until("the namespace's default ServiceAccount", lambda: cluster.kubectl(*account, check=False), 60)
    settings = PodSandboxSettings(
        job_image=IMAGE, job_namespace=NAMESPACE, job_labels="app.kubernetes.io/instance=bench", pod_name="bench"
    )
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    return PodRunner(core, settings, max_concurrent=1)


def checked(run: Callable[[], Awaitable[JobOutcome]], phases: dict[str, list[float]]) -> Callable[[], Awaitable[None]]:
    async def job() -> None:
        outcome = await run()
        assert outcome.status == "ok" and outcome.stdout == "1\n", outcome
        for phase, taken in outcome.timings_ms.items():
            phases.setdefault(phase, []).append(taken)

    return job


async def measure(cluster: Cluster, jobs: int, samples: int, workdir: str) -> None:
    case = PYTHON
    Path(workdir, case.toolchain.source_name).write_text(case.code)
    in_pods, in_bubblewrap = pod_runner(cluster), JobRunner(max_concurrent=1)
    pod_phases: dict[str, list[float]] = {}
    bwrap_phases: dict[str, list[float]] = {}

    modes = {
        "pod": mean_ms_of(jobs, checked(lambda: in_pods.run(case.code, "python"), pod_phases)),
        "bubblewrap": mean_ms_of(jobs, checked(lambda: in_bubblewrap.run(case.code, "python"), bwrap_phases)),
        "bare": mean_ms_of(jobs, lambda: run_bare(case, workdir)),
    }
    print(f"a python job ({case.code.strip()!r}: syntax, lint, run); {samples} samples of {jobs} jobs one at a time,")
    print(f"interleaved after a warm-up round; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    results = await interleave_async(modes, samples=samples, warmup=1)
    pod, bwrap, bare_run = results["pod"], results["bubblewrap"], results["bare"]
    print(f"  sandbox: pod (a job Pod)       {pod.format('ms', '{:.0f}')}")
    print(f"  sandbox: bubblewrap            {bwrap.format('ms', '{:.1f}')}")
    print(f"  bare {' '.join(case.bare_argv())}  {bare_run.format('ms', '{:.1f}')}")
    print(f"  pod / bubblewrap, per round    {ratio(pod, bwrap).format('x', '{:.1f}')}")
    print(f"  pod / bare, per round          {ratio(pod, bare_run).format('x', '{:.0f}')}")
    print(f"  bubblewrap / bare, per round   {ratio(bwrap, bare_run).format('x', '{:.2f}')}")
    for label, phases in (("pod", pod_phases), ("bubblewrap", bwrap_phases)):
        split = ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in phases.items())
        print(f"  {label}: the job's phases (median ms, warm-up included)  {split}")
    left = cluster.json("get", "pods", "-n", NAMESPACE)["items"]
    assert not left, f"job Pods outlived their jobs: {[p['metadata']['name'] for p in left]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5, help="measured rounds (one sample per mode per round)")
    parser.add_argument("--jobs", type=int, default=3, help="jobs per sample, one at a time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="genesis-pod-bench-") as tmp:
        clusters = local_cluster(Path(tmp), TIMINGS)
        cluster = next(clusters)
        try:
            workdir = Path(tmp, "bare")
            workdir.mkdir()
            asyncio.run(measure(cluster, args.jobs, args.samples, str(workdir)))
        finally:
            next(clusters, None)  # the node's teardown, which fails if it left anything behind
    print("\nlocal node, one run each, seconds")
    for step, seconds in TIMINGS.items():
        print(f"  {step:<40} {seconds:7.1f}")


if __name__ == "__main__":
    main()
