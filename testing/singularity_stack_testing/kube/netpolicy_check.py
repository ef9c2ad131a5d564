"""kube-network-policies, as scripts/build-network-policies.sh builds it, enforcing a NetworkPolicy from a 1.20
API server: run inside a network namespace of its own, so the host's network is never touched.

    unshare -n python -m singularity_stack_testing.kube.netpolicy_check    # prints one JSON object

In the namespace: etcd + kube-apiserver (kube/apiserver.py), three "Pods" (network namespaces of sleeping
processes, each behind a veth routed by this namespace, as the node routes a Pod's traffic) whose Pod objects
carry their IPs on one node, a server in one of them, and a policy that denies all egress of `role=job`.
It reports what a connection from each Pod meets with the policy, without it, and with it again, and whether
the nftables table is gone after kube-network-policies stops (SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from . import netpolicy
from .apiserver import ControlPlane, cache_dir

NODE = "node1"
SERVER = ("10.77.2.2", 8080)
PODS = {"job": 1, "server": 2, "other": 3}  # role -> subnet 10.77.<n>.0/24
PROBE = (
    "import socket\ntry:\n"
    f"    socket.create_connection({SERVER!r}, timeout=4)\n    print('connected')\n"
    "except OSError as exc:\n    print(type(exc).__name__)\n"
)
POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "deny-job", "namespace": "default"},
    "spec": {"podSelector": {"matchLabels": {"role": "job"}}, "policyTypes": ["Ingress", "Egress"]},
}


def _run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, check=True, capture_output=True, text=True).stdout


def _pod_netns(n: int) -> tuple[subprocess.Popen[bytes], list[str]]:
    holder = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    enter = ["nsenter", "-t", str(holder.pid), "-n"]
    for _ in range(50):  # until unshare has made the namespace and exec'd sleep
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
        time.sleep(0.05)
    _run("ip", "link", "add", f"h{n}", "type", "veth", "peer", "name", f"p{n}")
    _run("ip", "link", "set", f"p{n}", "netns", str(holder.pid))
    _run("ip", "addr", "add", f"10.77.{n}.1/24", "dev", f"h{n}")
    _run("ip", "link", "set", f"h{n}", "up")
    _run(*enter, "ip", "link", "set", "lo", "up")
    _run(*enter, "ip", "addr", "add", f"10.77.{n}.2/24", "dev", f"p{n}")
    _run(*enter, "ip", "link", "set", f"p{n}", "up")
    _run(*enter, "ip", "route", "add", "default", "via", f"10.77.{n}.1")
    return holder, enter


def _wait(what: str, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def main() -> dict[str, Any]:
    if _run("ip", "-o", "link").count("\n") != 1:  # a new namespace has only its loopback
        raise SystemExit("run it in a network namespace of its own (unshare -n)")
    _run("ip", "link", "set", "lo", "up")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")  # this namespace's own
    processes: list[subprocess.Popen[bytes]] = []
    plane = ControlPlane()
    knp: subprocess.Popen[bytes] | None = None
    try:
        enters = {}
        for role, n in PODS.items():
            holder, enters[role] = _pod_netns(n)
            processes.append(holder)
        server = ["python3", "-m", "http.server", str(SERVER[1]), "--bind", SERVER[0]]
        processes.append(subprocess.Popen([*enters["server"], *server], stderr=subprocess.DEVNULL))
        plane.start()
        kubectl = [str(cache_dir() / "bin" / "kubectl"), "--kubeconfig", str(plane.kubeconfig)]
        for role, n in PODS.items():
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": role, "namespace": "default", "labels": {"role": role}},
                "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "pause"}]},
            }
            created = json.loads(_run(*kubectl, "create", "-o", "json", "-f", "-", stdin=json.dumps(pod)))
            ip = f"10.77.{n}.2"
            created["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}  # as kubelet reports
            path = f"/api/v1/namespaces/default/pods/{role}/status"
            _run(*kubectl, "replace", "--raw", path, "-f", "-", stdin=json.dumps(created))
        _run(*kubectl, "apply", "-f", "-", stdin=json.dumps(POLICY))
        log = (plane.workdir or Path("/tmp")) / "kube-network-policies.log"
        with log.open("wb") as out:
            knp = subprocess.Popen(
                netpolicy.argv(netpolicy.binary(), plane.kubeconfig, NODE, 19080), stdout=out, stderr=out
            )
        _wait("kube-network-policies' table", netpolicy.table_exists)

        def probe(role: str) -> str:
            return _run(*enters[role], "python3", "-c", PROBE).strip()

        def settled(role: str, expected: str) -> str:
            # Its informers see a change within moments; a few probes rather than one fixed sleep.
            seen = ""
            for _ in range(5):
                seen = probe(role)
                if seen == expected:
                    break
            return seen

        result: dict[str, Any] = {
            "with policy": {"other": settled("other", "connected"), "job": settled("job", "TimeoutError")}
        }
        _run(*kubectl, "delete", "networkpolicy", "deny-job")
        result["policy deleted"] = {"job": settled("job", "connected")}
        _run(*kubectl, "apply", "-f", "-", stdin=json.dumps(POLICY))
        result["policy again"] = {"job": settled("job", "TimeoutError")}
        knp.send_signal(signal.SIGTERM)
        knp.wait(30)
        result["table after stop"] = netpolicy.table_exists()
        return result
    finally:
        if knp is not None and knp.poll() is None:
            knp.kill()
        plane.stop()
        for process in processes:
            process.kill()
            process.wait()


if __name__ == "__main__":
    print(json.dumps(main()))
