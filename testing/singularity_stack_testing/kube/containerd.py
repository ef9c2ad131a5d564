"""containerd for the local node: its configuration, the CNI network, the pause image, image import, cleanup.

Everything containerd owns (root, state, socket, runc's state, Pods' network namespaces) lives under one
run directory, so teardown knows where to look. Two settings are facts of these machines: root lacks
CAP_SYS_RESOURCE, so runc fails every sandbox ("can't get final child's PID from pipe: EOF") unless
containerd stops raising oom_score_adj (``restrict_oom_score_adj``); and there is no AppArmor.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from . import hoststate

CNI_BIN_DIR = "/usr/lib/cni"
K8S_NAMESPACE = "k8s.io"
PAUSE_REFERENCE = "localhost/singularity-e2e/pause:3.4.1"


class ContainerdError(RuntimeError):
    """containerd or ctr failed; the message carries ctr's output."""


def containerd_config(run_dir: Path, sandbox_image: str, cni_conf_dir: Path) -> str:
    """config.toml (version 2) with every path under ``run_dir``."""
    return f"""\
version = 2
root = "{run_dir}/root"
state = "{run_dir}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{run_dir}/containerd.sock"

[ttrpc]
  address = "{run_dir}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{run_dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{run_dir}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1
"""


def cni_config(bridge: str, subnet: str, gateway: str, ipam_dir: Path) -> dict[str, Any]:
    """A bridge network with host-local IPAM; the bridge is the Pods' gateway and masquerades their egress."""
    return {
        "cniVersion": "0.4.0",
        "name": "singularity-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _tar_bytes(members: dict[str, tuple[bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, (data, mode) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pause_image_archive(pause_binary: Path, reference: str, destination: Path) -> Path:
    """A docker-archive (what `docker save` writes) of a one-file image: the static pause binary as /pause."""
    layer = _tar_bytes({"pause": (pause_binary.read_bytes(), 0o755)})
    layer_digest = hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [reference], "Layers": [f"{layer_digest}.tar"]}])
    members = {
        f"{layer_digest}.tar": (layer, 0o644),
        config_name: (config, 0o644),
        "manifest.json": (manifest.encode(), 0o644),
    }
    destination.write_bytes(_tar_bytes(members))
    return destination


class Ctr:
    """The ctr client for one containerd socket, in the CRI's namespace."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str, timeout: float = 300) -> str:
        argv = ["ctr", "--address", str(self.socket), "--namespace", K8S_NAMESPACE, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def answers(self) -> bool:
        try:
            self("version", timeout=5)
        except (ContainerdError, subprocess.TimeoutExpired):
            return False
        return True

    def images(self) -> set[str]:
        return set(self("images", "list", "--quiet").split())

    def import_archive(self, archive: Path) -> set[str]:
        """Import a docker-archive or OCI archive; the image references that are new afterwards."""
        before = self.images()
        self("images", "import", str(archive))
        return self.images() - before


def shim_pids(socket: Path) -> list[int]:
    """containerd-shim processes started by the containerd listening on ``socket`` (they outlive it)."""
    return [pid for pid in hoststate.processes_mentioning(str(socket)) if "containerd-shim" in hoststate.argv0(pid)]


def kill_shims(socket: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (pids := shim_pids(socket)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
