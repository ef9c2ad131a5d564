"""Run a command under a seccomp profile in the OCI runtime-spec form, as an unprivileged user, the way
runc applies a Pod's Localhost profile: no_new_privs, then the filter, then exec.

    /usr/bin/python3 run_under_profile.py PROFILE.json UID -- COMMAND...

Debian's interpreter, for Debian's libseccomp binding (python3-seccomp); names this architecture does not
know are skipped, as runc skips them.
"""

import contextlib
import json
import os
import sys

import seccomp

OPS = {
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}
ARCHES = {
    "SCMP_ARCH_X86_64": "X86_64",
    "SCMP_ARCH_X86": "X86",
    "SCMP_ARCH_X32": "X32",
    "SCMP_ARCH_AARCH64": "AARCH64",
    "SCMP_ARCH_ARM": "ARM",
}


def action(name, errno_ret):
    if name == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(errno_ret)
    raise SystemExit(f"unsupported action {name}")


def build(profile):
    default_errno = profile.get("defaultErrnoRet", 1)
    f = seccomp.SyscallFilter(action(profile["defaultAction"], default_errno))
    for arch in profile["architectures"]:
        native = seccomp.Arch(getattr(seccomp.Arch, ARCHES[arch]))
        if not f.exist_arch(native):
            f.add_arch(native)
    for rule in profile["syscalls"]:
        act = action(rule["action"], rule.get("errnoRet", default_errno))
        args = [seccomp.Arg(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0)) for a in rule.get("args", [])]
        for name in rule["names"]:
            with contextlib.suppress(RuntimeError, ValueError):  # not a system call of this architecture
                f.add_rule(act, name, *args)
    return f


def main():
    path, uid, sep, *command = sys.argv[1:]
    assert sep == "--" and command
    with open(path) as file:
        f = build(json.load(file))
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))  # as Genesis runs in its Pod: not root, no capabilities
    f.load()  # sets no_new_privs first (libseccomp's default), as allowPrivilegeEscalation: false does
    os.execv(command[0], command)


main()
