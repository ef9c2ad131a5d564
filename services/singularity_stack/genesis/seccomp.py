"""A seccomp filter for Genesis's jobs: no new user namespaces, whatever bubblewrap can enforce itself.

bwrap's ``--disable-userns`` needs a /proc of the job's own, which container runtimes refuse (see
sandbox.py), so inside a Pod it cannot be used. This classic-BPF program, handed to bwrap with
``--seccomp FD``, refuses the same thing on every host: ``unshare`` and ``clone`` with CLONE_NEWUSER fail
with EPERM; ``clone3`` (whose flags live in memory a filter cannot read) fails with ENOSYS, on which glibc
falls back to ``clone``; syscalls of another ABI (x32, i386 compat) fail with ENOSYS.
"""

from __future__ import annotations

import errno
import platform
import struct
from typing import NamedTuple

CLONE_NEWUSER = 0x10000000

# struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6] (little endian here)
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_X32_SYSCALL_BIT = 0x40000000


class _Abi(NamedTuple):
    audit_arch: int
    unshare: int
    clone: int
    clone3: int
    has_x32: bool


_ABIS = {
    "x86_64": _Abi(0xC000003E, unshare=272, clone=56, clone3=435, has_x32=True),
    "aarch64": _Abi(0xC00000B7, unshare=97, clone=220, clone3=435, has_x32=False),
}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def no_new_user_namespaces(machine: str | None = None) -> bytes | None:
    """The filter for this machine's architecture (``platform.machine()``), or None where it is unknown."""
    abi = _ABIS.get(machine or platform.machine())
    if abi is None:
        return None
    enosys, eperm = _RET_ERRNO | errno.ENOSYS, _RET_ERRNO | errno.EPERM
    # Jump offsets count instructions after the jump; the comments number the instructions.
    program = [
        _insn(_LD_W_ABS, _ARCH),  # 0
        _insn(_JEQ_K, abi.audit_arch, jf=10),  # 1: another ABI -> 12
        _insn(_LD_W_ABS, _NR),  # 2
        # 3: x32 -> 12 (an ABI without x32 gets a check no syscall number matches, keeping the offsets)
        _insn(_JGE_K, _X32_SYSCALL_BIT, jt=8) if abi.has_x32 else _insn(_JEQ_K, 0xFFFFFFFF, jt=8),
        _insn(_JEQ_K, abi.clone3, jt=7),  # 4: -> 12
        _insn(_JEQ_K, abi.unshare, jt=2),  # 5: -> 8
        _insn(_JEQ_K, abi.clone, jt=1),  # 6: -> 8
        _insn(_RET_K, _RET_ALLOW),  # 7
        _insn(_LD_W_ABS, _ARG0_LOW),  # 8: the flags (CLONE_NEWUSER is in the low 32 bits)
        _insn(_JSET_K, CLONE_NEWUSER, jf=1),  # 9
        _insn(_RET_K, eperm),  # 10
        _insn(_RET_K, _RET_ALLOW),  # 11
        _insn(_RET_K, enosys),  # 12
    ]
    return b"".join(program)
