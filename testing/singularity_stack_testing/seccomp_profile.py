"""Genesis's Localhost seccomp profile, derived: the container runtime's default plus what bubblewrap needs.

    python -m singularity_stack_testing.seccomp_profile --write    # charts/singularity-stack/files/

How it is derived (tests/test_genesis_localhost_seccomp.py re-derives it and loads it with libseccomp):

1. The runtime default is moby's profiles/seccomp/default.json (data/, from github.com/moby/profiles at
   3c28324, Apache-2.0): Docker's profile, which containerd's built-in default (contrib/seccomp) and CRI-O's
   (containers/common) are generated from or kept equal to.
2. It is resolved for Genesis's container as Kubernetes runs it: every capability dropped, on amd64 or arm64.
   Rules a capability unlocks are left out, rules for other architectures too; the rest is written in the
   OCI runtime-spec form (no includes/excludes), which containerd reads as it is and CRI-O accepts.
3. What the default allows only to CAP_SYS_ADMIN and bubblewrap calls without it, inside the user namespace
   it creates, is allowed: clone with namespace flags, unshare, mount, umount2, pivot_root, sethostname
   (--hostname). Each is needed: the test runs Genesis's bwrap options under the profile less each one and
   sees bwrap fail. clone3 keeps the default's ENOSYS (glibc falls back to clone; its flags cannot be read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import ROOT

UPSTREAM = Path(__file__).resolve().parent / "data" / "moby-seccomp-default.json"
PROFILE_FILE = ROOT / "charts" / "singularity-stack" / "files" / "genesis-bubblewrap-seccomp.json"
ARCHES = ("amd64", "arm64")
# moby's archMap names the architectures by libseccomp's names; its includes/excludes by Go's.
SUB_ARCHES = {"amd64": ("amd64", "x86", "x32"), "arm64": ("arm64", "arm")}
LIBSECCOMP_ARCH = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}
BUBBLEWRAP_CALLS = ("clone", "unshare", "mount", "umount2", "pivot_root", "sethostname")

Rule = dict[str, Any]


def _applies(rule: Rule, caps: frozenset[str], arches: tuple[str, ...]) -> bool:
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if not set(includes.get("caps") or []) <= caps or caps & set(excludes.get("caps") or []):
        return False
    go_arches = {a for arch in arches for a in SUB_ARCHES[arch]}
    if includes.get("arches") and not go_arches & set(includes["arches"]):
        return False
    return not (excludes.get("arches") and go_arches <= set(excludes["arches"]))


def _flat(rule: Rule) -> Rule:
    flat: Rule = {"names": rule["names"], "action": rule["action"]}
    if "errnoRet" in rule:
        flat["errnoRet"] = rule["errnoRet"]
    if rule.get("args"):
        flat["args"] = [
            {"index": a["index"], "value": a["value"], "valueTwo": a.get("valueTwo", 0), "op": a["op"]}
            for a in rule["args"]
        ]
    return flat


def runtime_default(
    upstream: dict[str, Any], caps: frozenset[str] = frozenset(), arches: tuple[str, ...] = ARCHES
) -> dict[str, Any]:
    """The default profile as the runtime applies it to a container with `caps`, in runtime-spec form."""
    architectures = []
    for entry in upstream["archMap"]:
        if entry["architecture"] in {LIBSECCOMP_ARCH[a] for a in arches}:
            architectures += [entry["architecture"], *(entry["subArchitectures"] or [])]
    return {
        "defaultAction": upstream["defaultAction"],
        "defaultErrnoRet": upstream["defaultErrnoRet"],
        "architectures": architectures,
        "syscalls": [_flat(rule) for rule in upstream["syscalls"] if _applies(rule, caps, arches)],
    }


def with_bubblewrap(profile: dict[str, Any], calls: tuple[str, ...] = BUBBLEWRAP_CALLS) -> dict[str, Any]:
    # The default's clone rule (no namespace flags) is subsumed by the unconditional one.
    subsumed = ["clone"] if "clone" in calls else []
    syscalls = [rule for rule in profile["syscalls"] if not (rule["names"] == subsumed and rule.get("args"))]
    syscalls.append({"names": list(calls), "action": "SCMP_ACT_ALLOW"})
    return {**profile, "syscalls": syscalls}


def genesis_profile(calls: tuple[str, ...] = BUBBLEWRAP_CALLS) -> dict[str, Any]:
    return with_bubblewrap(runtime_default(json.loads(UPSTREAM.read_text())), calls)


def profile_json(profile: dict[str, Any]) -> str:
    return json.dumps(profile, indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        PROFILE_FILE.parent.mkdir(parents=True, exist_ok=True)
        PROFILE_FILE.write_text(profile_json(genesis_profile()))
        print(f"wrote {PROFILE_FILE}")
    else:
        sys.stdout.write(profile_json(genesis_profile()))
