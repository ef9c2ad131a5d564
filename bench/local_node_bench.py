"""Local-node benchmark: `kubectl apply` of a SingularityStack → Ready=True with every Pod Running, for N
Singularity instances, on the single-node cluster the e2e suite uses; and the cluster's start-up and
teardown times.

    sudo .venv/bin/python bench/local_node_bench.py [--instances 1 5]

Builds the images first (scripts/build-images.sh, from its layer cache after the first run), starts the
local node (singularity_stack_testing.kube.localnode), installs the chart (the operator runs as a Pod), then for each N
applies the example stack with managed PostgreSQL and N instances, waits, and deletes it (policy Delete).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from singularity_stack_testing.cluster import TIMINGS, wait_until
from singularity_stack_testing.providers import install_chart, local_cluster
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, example, stack_pods, wait_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()
    results: dict[int, float] = {}
    memory: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="local-node-bench-") as tmp:
        clusters = local_cluster(Path(tmp), TIMINGS)
        cluster = next(clusters)
        try:
            started = time.monotonic()
            install_chart(cluster)
            TIMINGS["chart install -> operator Ready"] = time.monotonic() - started
            for count in args.instances:
                name = f"bench-{count}"
                started = time.monotonic()
                cluster.apply(example(name, replicas=count, deletion_policy="Delete"))
                wait_ready(cluster, name, OTHER_PODS + count)
                results[count] = time.monotonic() - started
                print(f"N={count}: apply -> Ready=True, all {OTHER_PODS + count} Pods Running: {results[count]:.1f} s")
                time.sleep(10)  # let start-up settle before reading memory
                memory[count] = cluster.memory_rss()
                cluster.kubectl("delete", "singularitystack", name, "-n", NAMESPACE, "--timeout=5m")
                wait_until(f"{name}'s Pods to go", lambda name=name: not stack_pods(cluster, name), 300)
        finally:
            next(clusters, None)
    print("\nlocal node, figures in seconds")
    for step, seconds in TIMINGS.items():
        print(f"  {step:<40} {seconds:7.1f}")
    for count, seconds in results.items():
        print(f"  {'apply -> Ready, N=' + str(count):<40} {seconds:7.1f}")
    for count, usage in memory.items():
        pods = usage.pop("pods", 0)
        print(f"\nresident memory with N={count} ({OTHER_PODS + count} stack Pods + the operator), MiB:")
        print(f"  {'all Pods':<40} {pods / 2**20:7.0f}")
        print(f"  {'cluster components':<40} {sum(usage.values()) / 2**20:7.0f}")
        for name, rss in sorted(usage.items(), key=lambda item: -item[1]):
            print(f"    {name:<38} {rss / 2**20:7.0f}")


if __name__ == "__main__":
    main()
