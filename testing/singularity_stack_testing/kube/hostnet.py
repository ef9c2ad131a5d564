"""The host side of the local node's network, and putting the host back the way it was.

- The node IP lives on a dummy interface, in a documentation range the machine does not use, so nothing
  leaves the machine and nothing collides with its real addresses. The Service range is routed to that
  interface, so the host itself can open ClusterIPs (kube-proxy's OUTPUT rules then send them to Pods).
- Sysctls the node's components change (IP forwarding, bridge netfilter, kube-proxy's route_localnet,
  kubelet's kernel defaults) are recorded first and restored at teardown.
- iptables: kube-proxy, kubelet and the CNI bridge plugin add chains named KUBE-* and CNI-*; teardown
  rewrites each table without them and without the rules that jump to them.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

# Sysctls set by this module, by kubelet (protectKernelDefaults: false) and by kube-proxy.
TOUCHED_SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.conf.all.route_localnet",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Chains that belong to the node: kube-proxy's and kubelet's KUBE-*, the bridge plugin's CNI-*.
OWNED_CHAIN = re.compile(r"^(KUBE|CNI)-")
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")


class HostNetworkError(RuntimeError):
    """A host network change failed (missing privileges or tools); the message says which."""


def run(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise HostNetworkError(f"{argv[0]} is not installed") from None
    if check and result.returncode != 0:
        raise HostNetworkError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls(names: Iterable[str]) -> dict[str, str]:
    """Current values of the sysctls that exist on this kernel."""
    values = {}
    for name in names:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def write_sysctl(name: str, value: str) -> None:
    try:
        _sysctl_path(name).write_text(value + "\n")
    except OSError as exc:
        raise HostNetworkError(f"cannot set {name}={value}: {exc}") from None


def restore_sysctls(saved: dict[str, str]) -> None:
    for name, value in saved.items():
        with contextlib.suppress(OSError):
            if _sysctl_path(name).read_text().strip() != value:
                _sysctl_path(name).write_text(value + "\n")


def without_owned_chains(saved_table: str) -> str:
    """An ``iptables-save`` dump of one table minus the node's chains and every rule that mentions one."""
    kept = []
    for line in saved_table.splitlines():
        if line.startswith(":") and OWNED_CHAIN.match(line[1:]):
            continue
        if line.startswith("-A ") and any(OWNED_CHAIN.match(word) for word in line.split()):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def has_owned_chains(saved_table: str) -> bool:
    return any(line.startswith(":") and OWNED_CHAIN.match(line[1:]) for line in saved_table.splitlines())


def remove_owned_chains() -> list[str]:
    """Rewrite every loaded iptables/ip6tables table without the node's chains; the tables that changed."""
    changed = []
    for family in ("iptables", "ip6tables"):
        for table in IPTABLES_TABLES:
            try:
                saved = run(f"{family}-save", "-t", table, check=False)
            except HostNetworkError:
                continue
            if has_owned_chains(saved):
                run(f"{family}-restore", "-T", table, stdin=without_owned_chains(saved))
                changed.append(f"{family}/{table}")
    return changed


def owned_chains() -> list[str]:
    """The node's chains still present (for checking that teardown left nothing)."""
    found = []
    for family in ("iptables", "ip6tables"):
        for table in IPTABLES_TABLES:
            with contextlib.suppress(HostNetworkError):
                for line in run(f"{family}-save", "-t", table, check=False).splitlines():
                    if line.startswith(":") and OWNED_CHAIN.match(line[1:]):
                        found.append(f"{family}/{table}/{line[1:].split()[0]}")
    return found


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def address_in_use(ip: str) -> bool:
    return f"inet {ip}/" in run("ip", "-o", "-4", "addr", "show")


def add_node_interface(name: str, node_ip: str, routed: Iterable[str]) -> None:
    """A dummy-like interface holding the node IP, with ``routed`` CIDRs (the Service range) pointing at it."""
    if link_exists(name):
        raise HostNetworkError(f"interface {name} already exists (another local node running, or one left over?)")
    if address_in_use(node_ip):
        raise HostNetworkError(f"{node_ip} is already in use on this machine")
    # A dummy interface where the kernel has the module; else an empty bridge, which every node has (the CNI
    # bridge plugin needs the bridge module anyway) and which holds local addresses just as well.
    try:
        run("ip", "link", "add", name, "type", "dummy")
    except HostNetworkError:
        run("ip", "link", "add", name, "type", "bridge")
    run("ip", "addr", "add", f"{node_ip}/32", "dev", name)
    run("ip", "link", "set", name, "up")
    for cidr in routed:
        run("ip", "route", "add", cidr, "dev", name, "src", node_ip)


def delete_link(name: str) -> None:
    if link_exists(name):
        run("ip", "link", "delete", name, check=False)
