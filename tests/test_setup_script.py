"""scripts/setup.sh: a progress line per stage, and no pip run when nothing it installs from changed.

The script runs for real on a copy of scripts/ and pyproject.toml, with a stand-in for the virtualenv's
python (it records how it was called) and for dpkg-query (every Debian package installed), so the test
costs no download and never touches the project's own .venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/bash\necho "$*" >>"$(dirname "$0")/../../calls"\nexit "${FAKE_PIP_STATUS:-0}"\n')
    python.chmod(0o755)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "dpkg-query").write_text("#!/bin/bash\nprintf 'install ok installed'\n")
    (fake / "dpkg-query").chmod(0o755)
    return tmp_path


def setup(checkout: Path, *args: str, status: int = 0) -> tuple[list[str], str]:
    """Run setup.sh; the pip calls it made and its stderr."""
    calls = checkout / "calls"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{checkout / 'fakebin'}:{os.environ['PATH']}", "FAKE_PIP_STATUS": str(status)}
    result = subprocess.run(
        ["bash", "scripts/setup.sh", *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == status, result.stderr
    assert result.stdout == "", result.stdout
    return (calls.read_text().splitlines() if calls.exists() else []), result.stderr


def test_a_second_run_skips_pip_and_every_stage_says_what_it_does(checkout: Path) -> None:
    calls, progress = setup(checkout)
    assert calls == ["-m pip install -qq --upgrade pip", "-m pip install -qq -e ."]
    assert [line.split(" ", 2)[1] for line in progress.splitlines()[:3]] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "about 4 minutes" in progress
    calls, progress = setup(checkout)
    assert calls == []
    assert "up to date" in progress


def test_the_stamp_follows_pyproject_and_the_extras(checkout: Path) -> None:
    assert setup(checkout)[0]
    assert setup(checkout, "--test")[0] == [
        "-m pip install -qq --upgrade pip",
        "-m pip install -qq -e .[test]",
        "-m pip download -qq --no-deps --dest .venv/share/old-pgmq pgmq==1.1.3",  # tests/test_pgmq_upgrade.py's
    ]
    assert setup(checkout, "--test")[0] == []
    assert setup(checkout)[0] == []  # the test extra's install covers a plain run
    with (checkout / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a change\n")
    assert setup(checkout)[0] == ["-m pip install -qq --upgrade pip", "-m pip install -qq -e ."]


def test_a_failed_install_is_retried_next_time(checkout: Path) -> None:
    setup(checkout, status=1)
    assert not (checkout / ".venv" / ".setup-stamp").exists()
    assert setup(checkout)[0]
