"""The seccomp filter of Genesis's jobs: system calls a contained job has no use for fail with EPERM.

bubblewrap loads it (``--seccomp FD``) right before it execs the sandbox's first program, so it binds
every process of the job, the sandbox's own pid 1 included. It refuses:

- reaching into other processes: ``ptrace``, ``process_vm_readv/writev``, ``process_madvise``,
  ``pidfd_getfd``, ``kcmp`` (the pid-1 takeover: a job attaching to its init and exec'ing past its limits);
- kernel surfaces with a record of privilege escalations: ``bpf``, ``perf_event_open``, ``userfaultfd``,
  the keyring (``add_key``, ``request_key``, ``keyctl``), ``io_uring_*``;
- memory that no process maps, which rlimits do not see: ``memfd_create`` and ``memfd_secret`` (none of
  the runtimes needs them: the BEAM's JIT falls back to a single mapping; a job cgroup counts them too);
- mounts, namespaces and the machine: ``mount`` and the new mount API, ``setns``, ``pivot_root``, module
  loading, ``kexec_*``, ``reboot``, ``swapon/off``, ``acct``, ``open_by_handle_at``;
- sockets of any family but unix, IPv4, IPv6 and netlink (EAFNOSUPPORT): a network namespace does not
  isolate them all (AF_VSOCK reaches the hypervisor's port space);
- ``mmap`` with MAP_GROWSDOWN, which the kernel counts as stack, not data, so RLIMIT_DATA misses it;
- new user namespaces: ``unshare`` and ``clone`` with CLONE_NEWUSER. bwrap's ``--disable-userns`` needs a
  /proc of the job's own, which container runtimes refuse (see sandbox.py), so this is what holds in a
  Pod. ``clone3`` (whose flags live in memory a filter cannot read) fails with ENOSYS, on which glibc
  falls back to ``clone``.

System calls of another ABI (x32, i386 compat) fail with ENOSYS: the table below only names native ones.
The numbers are checked against the kernel headers in tests/test_genesis_seccomp.py.
"""

from __future__ import annotations

import errno
import platform
import struct
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000

# Denied system call -> (x86_64 number, aarch64 number).
DENIED: dict[str, tuple[int, int]] = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "process_madvise": (440, 440),
    "pidfd_getfd": (438, 438),
    "kcmp": (312, 272),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "memfd_create": (319, 279),
    "memfd_secret": (447, 447),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "open_by_handle_at": (304, 265),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
}
# Checked on their flags (unshare, clone) or refused with ENOSYS (clone3).
NAMESPACE_CALLS: dict[str, tuple[int, int]] = {"unshare": (272, 97), "clone": (56, 220), "clone3": (435, 435)}
# Checked on an argument: the address family (socket, socketpair), the mapping's flags (mmap).
CHECKED_CALLS: dict[str, tuple[int, int]] = {"socket": (41, 198), "socketpair": (53, 199), "mmap": (9, 222)}
SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
MAP_GROWSDOWN = 0x100


@dataclass(frozen=True)
class _Abi:
    audit_arch: int
    column: int  # which number of the tables above
    has_x32: bool


_ABIS = {
    "x86_64": _Abi(0xC000003E, column=0, has_x32=True),
    "aarch64": _Abi(0xC00000B7, column=1, has_x32=False),
}

# struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little endian here)
_NR, _ARCH, _ARG0_LOW, _ARG3_LOW = 0, 4, 16, 40
_X32_SYSCALL_BIT = 0x40000000


class _Program:
    """A tiny assembler: jumps name a label, resolved to classic BPF's relative offsets at the end."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int, str | None, str | None]] = []
        self._labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        self._code.append((code, k, jt, jf))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._code)

    def assemble(self) -> bytes:
        out = []
        for index, (code, k, jt, jf) in enumerate(self._code):
            offsets = [0 if target is None else self._labels[target] - index - 1 for target in (jt, jf)]
            if not all(0 <= offset <= 255 for offset in offsets):
                raise ValueError(f"seccomp jump out of range at instruction {index}")
            out.append(struct.pack("<HBBI", code, offsets[0], offsets[1], k))
        return b"".join(out)


def job_filter(machine: str | None = None) -> bytes | None:
    """The filter for this machine's architecture (``platform.machine()``), or None where it is unknown."""
    abi = _ABIS.get(machine or platform.machine())
    if abi is None:
        return None
    calls = {**DENIED, **NAMESPACE_CALLS, **CHECKED_CALLS}
    number = {name: numbers[abi.column] for name, numbers in calls.items()}
    p = _Program()
    p.op(_LD_W_ABS, _ARCH)
    p.op(_JEQ_K, abi.audit_arch, jf="enosys")
    p.op(_LD_W_ABS, _NR)
    if abi.has_x32:
        p.op(_JGE_K, _X32_SYSCALL_BIT, jt="enosys")
    p.op(_JEQ_K, number["clone3"], jt="enosys")
    p.op(_JEQ_K, number["unshare"], jt="flags")
    p.op(_JEQ_K, number["clone"], jt="flags")
    p.op(_JEQ_K, number["socket"], jt="family")
    p.op(_JEQ_K, number["socketpair"], jt="family")
    p.op(_JEQ_K, number["mmap"], jt="mapping")
    for name in DENIED:
        p.op(_JEQ_K, number[name], jt="eperm")
    p.op(_RET_K, _RET_ALLOW)
    p.label("flags")
    p.op(_LD_W_ABS, _ARG0_LOW)  # unshare's and clone's flags: CLONE_NEWUSER is in the low 32 bits
    p.op(_JSET_K, CLONE_NEWUSER, jt="eperm")
    p.op(_RET_K, _RET_ALLOW)
    p.label("family")
    p.op(_LD_W_ABS, _ARG0_LOW)
    for family in SOCKET_FAMILIES.values():
        p.op(_JEQ_K, family, jt="allow")
    p.op(_RET_K, _RET_ERRNO | errno.EAFNOSUPPORT)
    p.label("mapping")
    p.op(_LD_W_ABS, _ARG3_LOW)
    p.op(_JSET_K, MAP_GROWSDOWN, jt="eperm")
    p.label("allow")
    p.op(_RET_K, _RET_ALLOW)
    p.label("eperm")
    p.op(_RET_K, _RET_ERRNO | errno.EPERM)
    p.label("enosys")
    p.op(_RET_K, _RET_ERRNO | errno.ENOSYS)
    return p.assemble()
