"""Local-node benchmark: `kubectl apply` of a SingularityStack → Ready=True with every Pod Running, for N
Singularity instances, on the single-node cluster the e2e suite uses; and the cluster's start-up and
teardown times.

    sudo .venv/bin/python bench/local_node_bench.py [--instances 1 5] [--samples 3] [--warmup 1] [--upgrades 3]

Builds the images first (scripts/build-images.sh, from its layer cache after the first run), starts the
local node (singularity_stack_testing.kube.localnode), installs the chart (the operator runs as a Pod), then
applies the example stack with managed PostgreSQL, N instances, in rounds interleaved over the Ns (N=1, N=5,
N=1, N=5 ...; bench/samples.py) after `--warmup` rounds that are not counted; every stack is waited for,
measured and deleted (policy Delete) before the next. Each sample is about a minute (Ready, 10 s to settle
before reading memory, deletion). The cluster's own timings are one run each: they are reported, not compared.

Then `--upgrades` samples of an upgrade: a fresh stack (N=1) on the built image is bumped to a variant with
one more migration per service (singularity_stack_testing/image_variants.py); measured from the bump to every
service Pod running the new image and ready, the migration Jobs included (each gates its Deployment).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from samples import interleave, ratio

from singularity_stack_testing import image_variants
from singularity_stack_testing.cluster import IMAGE, TIMINGS, Cluster, wait_until
from singularity_stack_testing.providers import install_chart, local_cluster
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, example, stack_pods, wait_ready

MiB = 2**20


def apply_to_ready(cluster: Cluster, count: int, memory: list[dict[str, int]]) -> Callable[[], float]:
    """One sample: a fresh stack of `count` instances from apply to Ready, its memory, then its deletion."""
    serial = itertools.count()

    def measure() -> float:
        name = f"bench-{count}-{next(serial)}"  # a fresh name: nothing of an earlier stack can be reused
        started = time.monotonic()
        cluster.apply(example(name, replicas=count, deletion_policy="Delete"))
        wait_ready(cluster, name, OTHER_PODS + count)
        seconds = time.monotonic() - started
        time.sleep(10)  # let start-up settle before reading memory
        memory.append(cluster.memory_rss())
        print(f"    N={count}: apply -> Ready=True, all {OTHER_PODS + count} Pods Running: {seconds:.1f} s", flush=True)
        cluster.kubectl("delete", "singularitystack", name, "-n", NAMESPACE, "--timeout=5m")
        wait_until(f"{name}'s Pods to go", lambda: not stack_pods(cluster, name), 300)
        return seconds

    return measure


UPGRADED = f"{IMAGE}-bench-upgrade"


def upgrade(cluster: Cluster) -> Callable[[], float]:
    """One sample: a fresh stack on the built image, bumped to UPGRADED; image bump → all Pods on it."""
    serial = itertools.count()

    def measure() -> float:
        name = f"bench-upgrade-{next(serial)}"
        cluster.apply(example(name, replicas=1, deletion_policy="Delete"))
        wait_ready(cluster, name, OTHER_PODS + 1)
        started = time.monotonic()
        cluster.kubectl("patch", "singularitystack", name, "-n", NAMESPACE, "--type=merge",
                        "-p", json.dumps({"spec": {"image": UPGRADED}}))  # fmt: skip
        wait_until(
            f"{name} on {UPGRADED}",
            lambda: image_variants.service_pods_on(cluster, NAMESPACE, name, UPGRADED, OTHER_PODS),
            900,
            interval=0.5,
        )
        seconds = time.monotonic() - started
        print(f"    image bump -> all {OTHER_PODS} service Pods on the new image (4 migration Jobs): {seconds:.1f} s")
        cluster.kubectl("delete", "singularitystack", name, "-n", NAMESPACE, "--timeout=5m")
        wait_until(f"{name}'s Pods to go", lambda: not stack_pods(cluster, name), 300)
        return seconds

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--samples", type=int, default=3, help="measured rounds (one stack per N per round)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    parser.add_argument("--upgrades", type=int, default=3, help="upgrade samples (0: none), after one warm-up")
    args = parser.parse_args()
    memory: dict[int, list[dict[str, int]]] = {count: [] for count in args.instances}
    with tempfile.TemporaryDirectory(prefix="local-node-bench-") as tmp:
        clusters = local_cluster(Path(tmp), TIMINGS)
        cluster = next(clusters)
        try:
            started = time.monotonic()
            install_chart(cluster)
            TIMINGS["chart install -> operator Ready"] = time.monotonic() - started
            print(f"apply -> Ready; {args.samples} rounds after {args.warmup} warm-up, interleaved over N:")
            benches = {f"N={count}": apply_to_ready(cluster, count, memory[count]) for count in args.instances}
            results = interleave(benches, samples=args.samples, warmup=args.warmup)
            if args.upgrades:
                started = time.monotonic()
                migration = "CREATE TABLE bench_upgrade (id int PRIMARY KEY);\n"
                archive = image_variants.build_variant(
                    Path(tmp), IMAGE, UPGRADED, {f"{k}/0099.bench-upgrade.sql": migration for k in image_variants.KINDS}
                )
                image_variants.import_images(archive)
                TIMINGS["upgrade variant build + import"] = time.monotonic() - started
                print(f"upgrade; {args.upgrades} samples after 1 warm-up:")
                results |= interleave({"upgrade": upgrade(cluster)}, samples=args.upgrades, warmup=1)
        finally:
            next(clusters, None)
    print("\nlocal node, one run each, seconds")
    for step, seconds in TIMINGS.items():
        print(f"  {step:<40} {seconds:7.1f}")
    upgraded = results.pop("upgrade", None)
    print("apply -> Ready=True with every Pod Running:")
    for label, taken in results.items():
        print(f"  {label:<8} {taken.format('s', '{:.1f}')}")
    if upgraded is not None:
        print("image bump -> every service Pod on the new image, ready (its migration Jobs first):")
        print(f"  N=1      {upgraded.format('s', '{:.1f}')}")
    first = results[f"N={args.instances[0]}"]
    for label, taken in list(results.items())[1:]:
        print(f"  {label} / {first.name}, per round: {ratio(taken, first).format(number='{:.2f}')}")
    for count, readings in memory.items():
        measured = readings[args.warmup :]  # the warm-up rounds' readings come first
        pods = statistics.median(r.get("pods", 0) for r in measured)
        components = {
            name: statistics.median(r.get(name, 0) for r in measured) for name in measured[0] if name != "pods"
        }
        print(f"\nresident memory with N={count} ({OTHER_PODS + count} stack Pods + the operator), MiB, median of "
              f"{len(measured)}:")  # fmt: skip
        print(f"  {'all Pods':<40} {pods / MiB:7.0f}")
        print(f"  {'cluster components':<40} {sum(components.values()) / MiB:7.0f}")
        for name, rss in sorted(components.items(), key=lambda item: -item[1]):
            print(f"    {name:<38} {rss / MiB:7.0f}")


if __name__ == "__main__":
    main()
