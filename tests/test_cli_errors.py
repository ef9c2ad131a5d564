"""A mistake on the command line or in the environment is one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "singularity_stack.cli"]
SERVICE_VARIABLES = ("DATABASE_URL", "SHARED_QUEUE_DB_URL", "SHARED_QUEUE_URL", "SINGULARITY_INSTANCE")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    for mention in mentions:
        assert mention in lines[0], lines


@pytest.mark.parametrize(
    ("url", "mentions"),
    [
        ("not a url", ("--database-url", "connection info")),
        ("postgresql://nobody@127.0.0.1:1/nothing", ("--database-url", "Connection refused")),
    ],
)
def test_a_bad_database_url_for_migrations(url: str, mentions: tuple[str, ...]) -> None:
    assert_one_line_error(run("migrations", "--database-url", url), *mentions)


@pytest.mark.parametrize(
    ("service", "mentions"),
    [
        ("genesis", ("genesis", "DATABASE_URL", "SHARED_QUEUE_DB_URL")),
        ("centralcloud", ("centralcloud", "DATABASE_URL", "CENTRALCLOUD_API_TOKEN")),
    ],
)
def test_a_service_run_without_its_environment(service: str, mentions: tuple[str, ...]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES and not k.startswith(service.upper())}
    result = run("run", service, env=env)
    assert_one_line_error(result, *mentions)
    assert result.stdout == ""


def test_a_singularity_whose_database_does_not_name_it() -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env |= {
        "DATABASE_URL": "postgresql://a@localhost/elsewhere",
        "SHARED_QUEUE_DB_URL": "postgresql://a@localhost/shared_queue",
        "SINGULARITY_API_TOKEN": "x" * 32,
    }
    assert_one_line_error(run("run", "singularity", env=env), "SINGULARITY_INSTANCE")


def test_provision_against_a_postgresql_that_does_not_answer(tmp_path) -> None:
    result = run(
        "provision",
        "--admin-dsn",
        "postgresql://nobody@127.0.0.1:1/postgres",
        "--singularity-instances",
        "1",
        "--credentials-out",
        str(tmp_path / "credentials.json"),
    )
    assert_one_line_error(result, "cannot reach PostgreSQL", "Connection refused")
    assert result.returncode == 2


@pytest.mark.parametrize("value", ["0", "17", "two"])
def test_up_refuses_a_number_of_workers_out_of_range(value: str) -> None:
    result = run("up", "--nexus-workers", value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--nexus-workers: {value!r} is not a number of processes from 1 to 16" in result.stderr
