"""NetworkPolicy is enforced by the node process the local node runs for it (kube-network-policies, built by
scripts/build-network-policies.sh), against a 1.20 API server, on this kernel.

In a network namespace of its own (kube/netpolicy_check.py; the host's network is not touched): from Pods on
one node, one selected by a deny-all policy and one not, to a server in a third. The policy decides: the
selected Pod's connection is dropped while the policy exists, goes through once it is deleted, and is
dropped again when it is back; the other always connects. Stopped, it leaves no nftables table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from singularity_stack_testing.kube import netpolicy

pytestmark = pytest.mark.timeout(400)


def test_kube_network_policies_enforces_a_deny_all_policy_and_only_it() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, nftables)"
    elif not os.access(netpolicy.binary(), os.X_OK):
        reason = f"missing {netpolicy.binary()}; run {netpolicy.BUILD_SCRIPT} once on this machine"
    if reason:
        if os.environ.get("SINGULARITY_REQUIRE_KUBE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    argv = ["unshare", "-n", sys.executable, "-m", "singularity_stack_testing.kube.netpolicy_check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "with policy": {"other": "connected", "job": "TimeoutError"},
        "policy deleted": {"job": "connected"},
        "policy again": {"job": "TimeoutError"},
        "table after stop": False,
    }
