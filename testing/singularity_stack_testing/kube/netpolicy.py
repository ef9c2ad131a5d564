"""NetworkPolicy on the local node: kube-network-policies, Kubernetes SIGs' implementation (the one kind runs).

The bridge CNI enforces no NetworkPolicy. kube-network-policies runs as a node process: an nftables table
(`inet kube-network-policies`) queues the Pods' new connections to it over nfqueue, and it answers each from
the NetworkPolicies, Pods and Namespaces it watches (networking.k8s.io/v1 and core/v1: all 1.20 serves).
scripts/build-network-policies.sh builds it (and says what it adapts for this kernel). On stop it deletes its
table; a table left by a killed one is deleted here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import ROOT
from .hostnet import run

BUILD_SCRIPT = ROOT / "scripts" / "build-network-policies.sh"
DEFAULT_CACHE = Path("/var/cache/singularity-stack/kube-network-policies-1.1.1")
TABLE = ("inet", "kube-network-policies")


def binary() -> Path:
    """Where scripts/build-network-policies.sh puts it (env SINGULARITY_NETWORK_POLICIES_CACHE overrides)."""
    cache = Path(os.environ.get("SINGULARITY_NETWORK_POLICIES_CACHE") or DEFAULT_CACHE)
    return cache / "bin" / "kube-network-policies"


def argv(program: Path, kubeconfig: Path, node_name: str, metrics_port: int) -> list[str]:
    return [
        str(program),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node_name}",
        # A packet it cannot judge (or one queued while it is not running) is dropped, never let through.
        "--fail-open=false",
        # The build accepts established connections without upstream's conntrack label (see the script).
        "--strict-mode=false",
        "--disable-nri",  # containerd 1.6 here has no NRI: Pod IPs come from the API server
        "--netfilter-bug-1766-fix=false",  # fixed in the kernel since 6.12; the DNS path is not used here
        f"--metrics-bind-address=127.0.0.1:{metrics_port}",
        "--v=1",
    ]


def table_exists() -> bool:
    return bool(run("nft", "list", "table", *TABLE, check=False).strip())


def remove_table() -> bool:
    """Delete its table if there is one; whether there was."""
    if not table_exists():
        return False
    run("nft", "delete", "table", *TABLE)
    return True
