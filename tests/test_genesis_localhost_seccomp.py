"""The chart's Localhost seccomp profile for Genesis (charts/singularity-stack/files/): derived from the
runtime's default profile (singularity_stack_testing/seccomp_profile.py says how), then run two ways with
Genesis's bubblewrap options as an unprivileged user: loaded with libseccomp as runc loads it, and as the
linux.seccomp of a real runc container (the local node's runtime; containerd copies a Localhost profile
there) with a Pod's restrictions. bwrap runs under the profile, and fails under the default or with any
one of the added system calls taken away: the profile is the default plus exactly what bubblewrap needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from singularity_stack_testing import seccomp_profile

RUNNER = Path(__file__).resolve().parent / "seccomp" / "run_under_profile.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-seccomp (scripts/debian-test-packages.txt)
NOBODY = 65534
# Genesis's bwrap options (genesis/sandbox.py, _bwrap_argv), with and without a /proc of its own: in a
# container it has none, and then no --disable-userns either.
COMMON = [
    "--unshare-all",
    "--unshare-user",
    "--uid",
    "1000",
    "--gid",
    "1000",
    "--hostname",
    "genesis",
    "--die-with-parent",
    "--as-pid-1",
    "--new-session",
    "--ro-bind",
    "/usr",
    "/usr",
    *("--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"),
    *("--dev", "/dev", "--tmpfs", "/tmp", "--remount-ro", "/"),
]
VARIANTS = {
    "with /proc": ["--disable-userns", "--proc", "/proc", *COMMON],
    "in a container (no /proc)": COMMON,
}


def seccomp_binding_missing() -> str | None:
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("bwrap") is None:
        return "needs /usr/bin/python3 and bubblewrap"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import seccomp"], capture_output=True, text=True)
    return None if probe.returncode == 0 else "needs python3-seccomp (scripts/debian-test-packages.txt)"


def bwrap_under(profile: dict[str, Any], options: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    command = [bwrap, *options, "/bin/sh", "-c", 'echo "ran on $(hostname) as $(id -u)"']
    return subprocess.run(
        [SYSTEM_PYTHON, str(RUNNER), str(path), str(NOBODY), "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


@pytest.fixture(scope="module")
def loadable() -> None:
    if (why := seccomp_binding_missing()) is not None:
        pytest.skip(f"SKIPPED LOUDLY: the Localhost seccomp profile cannot be loaded here: {why}")


def test_the_shipped_profile_is_the_derived_one():
    shipped = seccomp_profile.PROFILE_FILE.read_text()
    assert shipped == seccomp_profile.profile_json(seccomp_profile.genesis_profile()), (
        "regenerate: python -m singularity_stack_testing.seccomp_profile --write"
    )


def test_the_profile_adds_only_bubblewraps_calls_to_the_default():
    default = seccomp_profile.runtime_default(json.loads(seccomp_profile.UPSTREAM.read_text()))
    profile = seccomp_profile.genesis_profile()
    added = [rule for rule in profile["syscalls"] if rule not in default["syscalls"]]
    assert added == [{"names": list(seccomp_profile.BUBBLEWRAP_CALLS), "action": "SCMP_ACT_ALLOW"}]
    dropped = [rule for rule in default["syscalls"] if rule not in profile["syscalls"]]
    assert [rule["names"] for rule in dropped] == [["clone"]]  # the default's clone without namespace flags
    # No capability's rules came along (a container without capabilities): bpf, reboot, setns stay refused.
    allowed = {name for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for name in rule["names"]}
    assert not allowed & {"bpf", "reboot", "init_module", "setns", "keyctl", "add_key", "kexec_load"}
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"


@pytest.mark.usefixtures("loadable")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bubblewrap_runs_under_the_profile(variant: str, tmp_path: Path):
    ran = bwrap_under(json.loads(seccomp_profile.PROFILE_FILE.read_text()), VARIANTS[variant], tmp_path)
    assert (ran.returncode, ran.stdout.strip()) == (0, "ran on genesis as 1000"), ran.stderr


@pytest.mark.usefixtures("loadable")
def test_bubblewrap_fails_under_the_runtime_default(tmp_path: Path):
    default = seccomp_profile.runtime_default(json.loads(seccomp_profile.UPSTREAM.read_text()))
    ran = bwrap_under(default, VARIANTS["with /proc"], tmp_path)
    assert ran.returncode != 0 and "namespace" in ran.stderr, ran


@pytest.mark.usefixtures("loadable")
@pytest.mark.parametrize("call", seccomp_profile.BUBBLEWRAP_CALLS)
def test_each_added_call_is_needed(call: str, tmp_path: Path):
    fewer = tuple(c for c in seccomp_profile.BUBBLEWRAP_CALLS if c != call)
    ran = bwrap_under(seccomp_profile.genesis_profile(fewer), VARIANTS["with /proc"], tmp_path)
    assert ran.returncode != 0 and ran.stderr.startswith("bwrap: "), ran


# -- in a real container: runc, the local node's runtime, with the profile as containerd hands it over --------


def runc_run(profile: dict[str, Any] | None, options: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """bwrap in a container as a Pod runs Genesis: uid 10001, no capabilities, no_new_privs, read-only root,
    the runtime's masked /proc; containerd reads a Localhost profile into the OCI spec's linux.seccomp as is."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    for directory in ("usr", "proc", "dev", "tmp", "sys"):
        (rootfs / directory).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (rootfs / link).symlink_to(f"usr/{link}")
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": "rootfs", "readonly": True}
    config["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]})
    config["process"].update(
        terminal=False,
        user={"uid": 10001, "gid": 10001},
        capabilities={kind: [] for kind in ("bounding", "effective", "permitted", "ambient")},
        noNewPrivileges=True,
        args=["/usr/bin/bwrap", *options, "/bin/sh", "-c", 'echo "ran on $(hostname) as $(id -u)"'],
    )
    if profile is not None:
        config["linux"]["seccomp"] = profile
    (bundle / "config.json").write_text(json.dumps(config))
    name = f"genesis-seccomp-{tmp_path.name}"[-60:]
    return subprocess.run(
        ["runc", "--root", str(tmp_path / "runc"), "run", "--bundle", str(bundle), name],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def runc() -> None:
    if shutil.which("runc") is None or os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: runc (scripts/debian-test-packages.txt) and root are needed to run a container")


@pytest.mark.usefixtures("runc")
def test_bubblewrap_runs_in_a_container_under_the_profile(tmp_path: Path):
    profile = json.loads(seccomp_profile.PROFILE_FILE.read_text())
    ran = runc_run(profile, VARIANTS["in a container (no /proc)"], tmp_path)
    assert (ran.returncode, ran.stdout.strip()) == (0, "ran on genesis as 1000"), ran.stderr


@pytest.mark.usefixtures("runc")
def test_in_a_container_a_proc_of_its_own_fails_with_or_without_seccomp(tmp_path: Path):
    """Why Genesis mounts no /proc in a container: the runtime's masked /proc forbids it, not the profile."""
    for profile in (json.loads(seccomp_profile.PROFILE_FILE.read_text()), None):
        ran = runc_run(profile, VARIANTS["with /proc"], tmp_path / ("profile" if profile else "unconfined"))
        assert ran.returncode != 0 and "Can't mount proc" in ran.stderr, ran


@pytest.mark.usefixtures("runc")
def test_bubblewrap_fails_in_a_container_under_the_runtime_default(tmp_path: Path):
    default = seccomp_profile.runtime_default(json.loads(seccomp_profile.UPSTREAM.read_text()))
    ran = runc_run(default, VARIANTS["in a container (no /proc)"], tmp_path)
    assert ran.returncode != 0 and "bwrap:" in ran.stderr, ran
