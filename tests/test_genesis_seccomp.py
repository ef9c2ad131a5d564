"""The seccomp filter of Genesis's jobs, read as the kernel reads it: a classic BPF program run on
`struct seccomp_data`. Its system call numbers are checked against the kernel's own headers."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from singularity_stack.genesis import seccomp

ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
EAFNOSUPPORT = 0x00050000 | errno.EAFNOSUPPORT
ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
# Where linux-libc-dev keeps each architecture's numbers (aarch64 uses the generic table).
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


def run_filter(program: bytes, nr: int, arch: int, arg0: int = 0, arg3: int = 0) -> int:
    """Evaluate the filter the way the kernel does, for one system call; returns the action."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, arg3, 0, 0)
    code = [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op in (0x15, 0x35, 0x45):  # BPF_JMP | JEQ / JGE / JSET, constant operand
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {op:#x} at {pc}")


@pytest.mark.parametrize("machine", sorted(ARCHES))
def test_every_denied_call_is_refused_and_ordinary_ones_are_allowed(machine: str) -> None:
    program = seccomp.job_filter(machine)
    assert program is not None
    arch, column = ARCHES[machine]
    denied = {numbers[column] for numbers in seccomp.DENIED.values()}
    for name, numbers in seccomp.DENIED.items():
        assert run_filter(program, numbers[column], arch) == EPERM, name
    unshare, clone, clone3 = (seccomp.NAMESPACE_CALLS[n][column] for n in ("unshare", "clone", "clone3"))
    assert run_filter(program, unshare, arch, seccomp.CLONE_NEWUSER) == EPERM
    assert run_filter(program, clone, arch, seccomp.CLONE_NEWUSER | 0x11) == EPERM
    assert run_filter(program, clone, arch, 0x11) == ALLOW  # fork's flags (SIGCHLD)
    assert run_filter(program, clone3, arch) == ENOSYS  # glibc falls back to clone
    checked = {numbers[column] for numbers in seccomp.CHECKED_CALLS.values()}
    ordinary = [n for n in range(0, 460) if n not in denied | checked | {unshare, clone, clone3}]
    assert all(run_filter(program, n, arch) == ALLOW for n in ordinary)
    socket, socketpair, mmap = (seccomp.CHECKED_CALLS[n][column] for n in ("socket", "socketpair", "mmap"))
    for call in (socket, socketpair):
        assert [run_filter(program, call, arch, family) for family in (1, 2, 10, 16)] == [ALLOW] * 4
        # AF_PACKET, AF_BLUETOOTH, AF_ALG, AF_VSOCK: a network namespace does not isolate vsock at all
        assert {run_filter(program, call, arch, family) for family in (17, 31, 38, 40)} == {EAFNOSUPPORT}
    private_anonymous = 0x22
    assert run_filter(program, mmap, arch, arg3=private_anonymous) == ALLOW
    assert run_filter(program, mmap, arch, arg3=private_anonymous | seccomp.MAP_GROWSDOWN) == EPERM
    assert run_filter(program, 0, 0x40000003) == ENOSYS  # i386 compat: another ABI
    if machine == "x86_64":
        assert run_filter(program, 0x40000000 | 101, arch) == ENOSYS  # x32 ptrace


def test_memfd_create_and_the_pid_1_takeover_calls_are_in_the_list() -> None:
    required = {"ptrace", "process_vm_readv", "process_vm_writev", "memfd_create", "bpf", "perf_event_open"}
    required |= {"userfaultfd", "add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter"}
    assert required <= set(seccomp.DENIED)
    assert seccomp.job_filter("riscv64") is None  # unknown ABI: no filter rather than a wrong one


@pytest.mark.parametrize("machine", sorted(HEADERS))
def test_the_numbers_are_the_kernels(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"MISSING TOOL: {header} not found — apt-get install linux-libc-dev")
    numbers = dict(re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text()))
    _, column = ARCHES[machine]
    for name, pair in {**seccomp.DENIED, **seccomp.NAMESPACE_CALLS, **seccomp.CHECKED_CALLS}.items():
        assert int(numbers[name]) == pair[column], f"{machine} {name}"
