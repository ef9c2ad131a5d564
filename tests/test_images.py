"""The two Dockerfiles, checked without building them (fast, no network).

Building and smoke-testing the images is scripts/build-images.sh's job (buildah, minutes); these tests only
lint what a build would trip over or a Pod would reject: the base, numeric users that match the operator's
security contexts, tini as the entrypoint, COPY sources that exist, no Dockerfile heredocs (buildah 1.28,
Debian bookworm's, does not support them), and shell scripts that parse and pass shellcheck.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from singularity_operator import api, objects

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "images" / "Dockerfile"
POSTGRES = ROOT / "images" / "postgres" / "Dockerfile"
ENTRYPOINT = ROOT / "images" / "postgres" / "entrypoint.sh"
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
DOCKERFILES = [pytest.param(APP, id="app"), pytest.param(POSTGRES, id="postgres")]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(dockerfile: Path) -> list[Instruction]:
    """The Dockerfile's instructions, comments dropped and continuation lines joined."""
    result: list[Instruction] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{dockerfile}: unterminated continuation line"
    return result


def args_of(dockerfile: Path, keyword: str) -> list[str]:
    return [i.args for i in instructions(dockerfile) if i.keyword == keyword]


def build_args(dockerfile: Path) -> dict[str, str | None]:
    declared = [arg.partition("=") for arg in args_of(dockerfile, "ARG")]
    return {name: (default if sep else None) for name, sep, default in declared}


def env_of(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(dockerfile, "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def run_commands(dockerfile: Path) -> str:
    return "\n".join(args_of(dockerfile, "RUN"))


def pyproject_pin(package: str) -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in dependencies if re.match(rf"{re.escape(package)}(\[.*\])?==", d)]
    return pin.split("==", 1)[1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_base_is_debian_bookworm(dockerfile: Path):
    assert args_of(dockerfile, "FROM") == ["${BASE}"], "one stage, from the BASE build arg"
    base = build_args(dockerfile)["BASE"]
    assert base is not None and re.fullmatch(r"debian:bookworm(-slim)?", base)
    # The locally built base (scripts/build-images.sh) has no registry: nothing may insist on pulling.
    assert "--platform" not in args_of(dockerfile, "FROM")[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_no_heredocs_and_only_known_instructions(dockerfile: Path):
    known = {"ARG", "FROM", "ENV", "RUN", "COPY", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "WORKDIR", "LABEL"}
    assert {i.keyword for i in instructions(dockerfile)} <= known
    # Debian bookworm's buildah (1.28) reads a heredoc's body as Dockerfile instructions.
    assert "<<" not in run_commands(dockerfile)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_host_build_configuration_is_only_build_args(dockerfile: Path):
    """The build host's pip/apt configuration comes in as ARGs (not persisted), never as ENV or COPY."""
    declared = build_args(dockerfile)
    assert "PIP_CONFIG_FILE" in declared and "APT_CONFIG" in declared
    assert declared["PIP_CONFIG_FILE"] is None and declared["APT_CONFIG"] is None
    env = env_of(dockerfile)
    assert not {"PIP_CONFIG_FILE", "APT_CONFIG", "PIP_CERT", "PIP_INDEX_URL", "SSL_CERT_FILE"} & env.keys()
    assert "ca-certificates.crt" not in " ".join(args_of(dockerfile, "COPY"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copy_sources_exist_in_the_build_context(dockerfile: Path):
    copies = args_of(dockerfile, "COPY")
    assert copies
    for copy in copies:
        *sources, _dest = [word for word in shlex.split(copy) if not word.startswith("--")]
        assert sources
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.relative_to(ROOT)}: COPY source {source} is missing"


@pytest.mark.parametrize(
    ("dockerfile", "uid"),
    [pytest.param(APP, objects.SERVICE_UID, id="app"), pytest.param(POSTGRES, 999, id="postgres")],
)
def test_the_user_is_numeric_and_exists_in_the_image(dockerfile: Path, uid: int):
    """runAsNonRoot can only verify a numeric USER; initdb and postgres refuse a uid without a passwd entry."""
    users = args_of(dockerfile, "USER")
    assert users and users[-1] == str(uid)
    created = re.search(r"useradd\b[^&]*--uid (\d+)\b[^&]*--gid (\d+)\b", run_commands(dockerfile))
    assert created and created.groups() == (str(uid), str(uid))
    assert re.search(rf"groupadd\b[^&]*--gid {uid}\b", run_commands(dockerfile))


def test_the_images_are_the_ones_the_operator_deploys_by_default():
    """scripts/build-images.sh tags the images with the project's version, as the operator names them."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    deployed = {api.DEFAULT_IMAGE, api.ManagedPostgres().image}
    assert deployed == {f"singularity-stack:{version}", f"singularity-stack-postgres:{version}"}
    script = BUILD_SCRIPT.read_text()
    assert "app=singularity-stack:$version" in script and "postgres=singularity-stack-postgres:$version" in script


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_tini_is_pid_1(dockerfile: Path):
    [entrypoint] = args_of(dockerfile, "ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: tini, not a shell, is PID 1
    assert argv[:2] == ["/usr/bin/tini", "--"] and len(argv) == 3
    assert re.search(r"apt-get install[^&]*\btini\b", run_commands(dockerfile))


def test_the_app_image_runs_the_projects_command():
    [entrypoint] = args_of(APP, "ENTRYPOINT")
    assert json.loads(entrypoint)[2] == "singularity-stack"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "singularity-stack" in scripts
    assert env_of(APP)["PATH"].startswith("/opt/singularity/bin:")
    assert "python3 -m venv /opt/singularity" in run_commands(APP)  # PEP 668: no system-wide pip
    # Genesis runs jobs with Debian's interpreters inside bubblewrap.
    for package in ("bubblewrap", "nodejs", "elixir", "shellcheck", "python3"):
        assert re.search(rf"apt-get install[^&]*\b{package}\b", run_commands(APP)), package


def test_the_postgres_image_matches_the_operators_statefulset():
    [statefulset, _service] = objects.managed_postgres("s", "ns", api.parse_spec({}))
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 999
    assert args_of(POSTGRES, "USER")[-1] == "999"
    [container, exporter] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PGDATA"] == env_of(POSTGRES)["PGDATA"]
    # the metrics sidecar runs Debian's exporter from the same image
    assert exporter["image"] == container["image"]
    assert exporter["command"][0] == "/usr/bin/prometheus-postgres-exporter"
    assert re.search(r"apt-get install[^&]*\bprometheus-postgres-exporter\b", run_commands(POSTGRES))
    assert env["PGDATA"].startswith(container["volumeMounts"][0]["mountPath"] + "/")
    probe = container["readinessProbe"]["exec"]["command"][0]
    assert probe == "/usr/lib/postgresql/15/bin/pg_isready"
    assert re.search(r"apt-get install[^&]*\bpostgresql-15\b", run_commands(POSTGRES))
    assert [f"{objects.POSTGRES_PORT}"] == args_of(POSTGRES, "EXPOSE")
    # Debian's packages would create and ship a "main" cluster; the entrypoint initialises $PGDATA instead.
    assert "create_main_cluster) .*$/\\1 = false/" in run_commands(POSTGRES)


def test_pgmq_in_the_postgres_image_is_the_projects_pin():
    pinned = re.findall(r"pgmq==([\w.]+)", run_commands(POSTGRES))
    assert pinned == [pyproject_pin("pgmq")]
    assert "pgmq.control" in run_commands(POSTGRES)
    assert "/usr/share/postgresql/15/extension" in run_commands(POSTGRES)


def test_the_entrypoint_is_an_executable_posix_script():
    assert ENTRYPOINT.stat().st_mode & 0o111, "COPY keeps the mode: the entrypoint must be executable"
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    text = ENTRYPOINT.read_text()
    assert ': "${POSTGRES_PASSWORD:?' in text
    assert 'exec "$BIN/postgres"' in text  # postgres replaces the shell, so tini signals it directly


def test_the_build_script_parses():
    assert BUILD_SCRIPT.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], check=True)


@pytest.mark.parametrize(
    ("script", "shell"),
    [pytest.param(ENTRYPOINT, "sh", id="entrypoint"), pytest.param(BUILD_SCRIPT, "bash", id="build")],
)
def test_shell_scripts_pass_shellcheck(script: Path, shell: str):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(
        ["shellcheck", "--external-sources", "--shell", shell, str(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
