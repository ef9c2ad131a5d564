"""The kind provider (singularity_stack_testing.providers.kind_cluster) through pytest-kind's KindCluster.

No Docker engine exists here, so `docker`, `kind` and `kubectl` are fakes on PATH (the true edge): one small
script under the three names that records each call's argv and does what the real tool would for it (kind
writes the kubeconfig it is told to, `docker info` answers or fails as an engine would). Everything between
them and the e2e suite is the real code: pytest-kind's KindCluster and the provider.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from pytest_kind.cluster import KIND_VERSION, KUBECTL_VERSION

from singularity_stack_testing import providers
from singularity_stack_testing.cluster import IMAGE, POSTGRES_IMAGE

FAKE = r"""#!{python}
import json, os, sys
from pathlib import Path

tool, args = Path(sys.argv[0]).name, sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps([sys.argv[0], *args]) + "\n")
if tool == "docker" and args[:1] == ["info"] and os.environ.get("FAKE_NO_ENGINE"):
    sys.exit("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?")
if tool == "kind" and args[:2] == ["create", "cluster"]:
    [kubeconfig] = [a.split("=", 1)[1] for a in args if a.startswith("--kubeconfig=")]
    [name] = [a.split("=", 1)[1] for a in args if a.startswith("--name=")]
    Path(kubeconfig).write_text(json.dumps({{
        "apiVersion": "v1", "kind": "Config", "current-context": "kind-" + name,
        "clusters": [{{"name": "kind-" + name, "cluster": {{"server": "https://127.0.0.1:6443"}}}}],
        "users": [{{"name": "kind-" + name, "user": {{"token": "t"}}}}],
        "contexts": [{{"name": "kind-" + name, "context": {{"cluster": "kind-" + name, "user": "kind-" + name}}}}],
    }}))
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """docker, kind and kubectl as fakes first on PATH; their calls in $FAKE_CALLS, one JSON argv a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl"):
        path = bin_dir / tool
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.chdir(tmp_path)  # KindCluster makes .pytest-kind/ in the working directory
    return bin_dir


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def commands(tmp_path: Path, bin_dir: Path) -> list[str]:
    """Each call as `tool arg ...`, the tool named by its path relative to the fakes (so a tool taken from
    anywhere but PATH would show as its full path)."""
    shown = []
    for argv in calls(tmp_path):
        tool = Path(argv[0])
        name = tool.name if tool.parent == bin_dir else str(tool)
        shown.append(" ".join([name, *argv[1:]]))
    return shown


def expected_run(name: str, kubeconfig: Path) -> list[str]:
    root = providers.ROOT
    return [
        "docker info",
        "kind get clusters",
        f"kind create cluster --name={name} --kubeconfig={kubeconfig}",
        "kubectl wait --for=condition=Ready nodes --all --timeout=180s",
        f"docker build -f {root / 'images/Dockerfile'} -t {IMAGE} {root}",
        f"kind load docker-image --name {name} {IMAGE}",
        f"docker build -f {root / 'images/postgres/Dockerfile'} -t {POSTGRES_IMAGE} {root}",
        f"kind load docker-image --name {name} {POSTGRES_IMAGE}",
    ]


def test_the_cluster_is_made_by_kind_cluster_with_the_path_binaries_loaded_and_deleted(tmp_path: Path, fakes: Path):
    timings: dict[str, float] = {}
    work = tmp_path / "e2e"
    work.mkdir()
    name = f"singularity-e2e-{os.getpid()}"
    with contextlib.contextmanager(providers.kind_cluster)(work, timings) as cluster:
        assert cluster.provider == "kind"
        assert cluster.kubeconfig == work / "kubeconfig"
        assert json.loads(cluster.kubeconfig.read_text())["current-context"] == f"kind-{name}"
        assert cluster.kubectl_binary == str(fakes / "kubectl")
        assert commands(tmp_path, fakes) == expected_run(name, work / "kubeconfig")
        # the e2e suite's own kubectl calls go to the PATH kubectl, with the cluster's kubeconfig
        cluster.kubectl("get", "nodes")
        assert commands(tmp_path, fakes)[-1] == f"kubectl --kubeconfig {work / 'kubeconfig'} get nodes"
    assert commands(tmp_path, fakes)[-1] == f"kind delete cluster --name={name} --kubeconfig={work / 'kubeconfig'}"
    assert set(timings) == {"cluster start", "image build and load", "cluster teardown"}
    assert not (tmp_path / ".pytest-kind").exists()  # KindCluster's scratch folder: nothing went there


def test_the_cluster_is_deleted_when_the_body_fails(tmp_path: Path, fakes: Path):
    name = f"singularity-e2e-{os.getpid()}"
    with (
        pytest.raises(RuntimeError, match="the test failed"),
        contextlib.contextmanager(providers.kind_cluster)(tmp_path, {}),
    ):
        raise RuntimeError("the test failed")
    done = commands(tmp_path, fakes)
    assert done[-1] == f"kind delete cluster --name={name} --kubeconfig={tmp_path / 'kubeconfig'}"
    assert sum(c.startswith("kind delete") for c in done) == 1


def test_no_docker_engine_is_unavailable_with_the_engines_reason(tmp_path: Path, fakes: Path, monkeypatch):
    monkeypatch.setenv("FAKE_NO_ENGINE", "1")
    with pytest.raises(providers.ProviderUnavailable) as unavailable:
        next(providers.kind_cluster(tmp_path, {}))
    assert "no Docker engine answers" in str(unavailable.value)
    assert "Cannot connect to the Docker daemon" in str(unavailable.value)
    assert commands(tmp_path, fakes) == ["docker info"]  # no cluster was asked for


def test_no_docker_on_path_is_unavailable(tmp_path: Path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(providers.ProviderUnavailable, match="docker not on PATH"):
        next(providers.kind_cluster(tmp_path, {}))


def test_binaries_missing_from_path_are_left_to_kind_cluster_to_download(tmp_path: Path, fakes: Path, monkeypatch):
    assert providers.kind_binaries(tmp_path) == (fakes / "kind", fakes / "kubectl")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    kind, kubectl = providers.kind_binaries(tmp_path)
    # paths that do not exist yet: KindCluster.ensure_kind / ensure_kubectl fetch the pinned releases there
    assert (kind, kubectl) == (tmp_path / f"kind-{KIND_VERSION}", tmp_path / f"kubectl-{KUBECTL_VERSION}")
    assert not kind.exists() and not kubectl.exists()
