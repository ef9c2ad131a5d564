"""The local node's own promises: a node whose test process is killed outright leaves debris that the next
node removes before it starts. (Its clean teardown is checked after every e2e session: see
singularity_stack_testing.providers.)

Runs first (e2e/conftest.py puts it before every module that uses the shared cluster), while no other node
is up; only with the local provider.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from singularity_stack_testing.cluster import wait_until
from singularity_stack_testing.kube import hostnet, hoststate, localnode

CHILD = """
import time
from singularity_stack_testing.kube.localnode import LocalNode
node = LocalNode().start()
print(node.workdir, flush=True)
time.sleep(600)
"""


@pytest.fixture
def local_provider(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster-provider") != "local":
        pytest.skip("only for the local node provider")
    reason = localnode.unavailable_reason()
    if reason:
        if os.environ.get("SINGULARITY_REQUIRE_KUBE") == "1":
            pytest.fail(reason)
        pytest.skip(f"LOCAL NODE NOT AVAILABLE: {reason}")


@pytest.mark.timeout(300)
def test_a_node_killed_outright_is_reclaimed_by_the_next(local_provider: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    workdir = Path(child.stdout.readline().strip())
    assert workdir.is_dir(), "the node did not start"
    assert localnode.running_kubelets()
    assert localnode.unavailable_reason() is not None  # one node at a time
    child.send_signal(signal.SIGKILL)
    child.wait()
    # Its own children die with it (PDEATHSIG); what they made does not.
    wait_until("the node's processes to die", lambda: not localnode.running_kubelets(), 30, interval=0.2)
    assert workdir.exists() and hostnet.link_exists(localnode.NODE_LINK) and hostnet.owned_chains()

    removed = localnode.reclaim_leftovers()
    assert any("run directory" in item for item in removed), removed
    assert not workdir.exists()
    assert not hostnet.link_exists(localnode.NODE_LINK)
    assert not hostnet.owned_chains()
    assert not hoststate.mounts_under(workdir)
    assert localnode.unavailable_reason() is None
