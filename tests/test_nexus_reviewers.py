"""Named HITL reviewers: the hashed token store (nexus/reviewers.py) and `singularity-stack reviewers`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from singularity_stack.nexus.reviewers import (
    SHARED_IDENTITY,
    ReviewerFile,
    Reviewers,
    ReviewersError,
    hash_token,
)
from singularity_stack.securefile import UnsafeFileError

CLI = [sys.executable, "-m", "singularity_stack.cli"]


def stored(path: Path) -> dict[str, str]:
    return json.loads(path.read_text())


def test_add_stores_only_a_hash_of_a_strong_token(tmp_path: Path) -> None:
    file = ReviewerFile(tmp_path / "reviewers.json")
    alice, bob = file.add("alice"), file.add("Bob Ström")
    assert alice != bob and len(alice) >= 43  # 32 random bytes, base64url
    text = (tmp_path / "reviewers.json").read_text()
    assert alice not in text and bob not in text
    assert stored(tmp_path / "reviewers.json") == {
        "Bob Ström": "sha256:" + hashlib.sha256(bob.encode()).hexdigest(),
        "alice": "sha256:" + hashlib.sha256(alice.encode()).hexdigest(),
    }
    assert stat.S_IMODE(os.stat(tmp_path / "reviewers.json").st_mode) == 0o600
    assert file.names() == ["Bob Ström", "alice"]
    reviewers = Reviewers(tmp_path / "reviewers.json")
    assert reviewers.authenticate(alice) == "alice" and reviewers.authenticate(bob) == "Bob Ström"
    assert reviewers.authenticate(alice[:-1]) is None and reviewers.authenticate("") is None
    assert reviewers.authenticate(hash_token(alice)) is None  # the stored hash is not a token


def test_names_are_checked_and_each_reviewer_is_added_once(tmp_path: Path) -> None:
    file = ReviewerFile(tmp_path / "reviewers.json")
    file.add("alice")
    with pytest.raises(ReviewersError, match=r"^name: reviewer 'alice' is already in"):
        file.add("alice")
    for bad in ("", " alice", "<b>eve</b>", "x" * 65, SHARED_IDENTITY, "system"):
        with pytest.raises(ReviewersError, match=r"^name: "):
            file.add(bad)
    with pytest.raises(ReviewersError, match=r"^name: no reviewer 'carol'"):
        file.remove("carol")
    assert file.names() == ["alice"]


def test_remove_takes_effect_at_the_next_lookup(tmp_path: Path) -> None:
    path = tmp_path / "reviewers.json"
    file = ReviewerFile(path)
    alice, bob = file.add("alice"), file.add("bob")
    reviewers = Reviewers(path)
    assert reviewers.authenticate(bob) == "bob" and reviewers.stored_hash("bob") == hash_token(bob)
    file.remove("bob")
    assert reviewers.authenticate(bob) is None and reviewers.stored_hash("bob") is None
    assert reviewers.authenticate(alice) == "alice" and reviewers.any_named()
    file.remove("alice")
    assert not reviewers.any_named()
    carol = file.add("carol")  # a file written after Nexus started is read too
    assert reviewers.authenticate(carol) == "carol"


def test_a_missing_file_has_no_reviewers_and_a_broken_one_lets_no_one_in(tmp_path: Path) -> None:
    path = tmp_path / "reviewers.json"
    reviewers = Reviewers(path)  # not there yet (an optional Kubernetes Secret): nobody named
    assert not reviewers.any_named() and reviewers.authenticate("anything") is None
    token = ReviewerFile(path).add("alice")
    assert reviewers.authenticate(token) == "alice"
    path.write_text('{"alice": "sha256:' + "0" * 63)  # a half-edited file
    assert reviewers.authenticate(token) is None
    assert reviewers.any_named()  # fail closed: the shared token does not come back either
    path.write_text(json.dumps({"alice": hash_token(token)}))
    assert reviewers.authenticate(token) == "alice"
    for text, reason in (
        ("[]", "expected an object"),
        ('{"alice": "md5:abc"}', "'alice': expected 'sha256:'"),
        ('{"shared-token": "sha256:' + "0" * 64 + '"}', "is reserved"),
        ("{not json", "not JSON"),
    ):
        path.write_text(text)
        with pytest.raises(ReviewersError, match=reason):
            Reviewers(path)  # at Nexus's start: an error, not an empty list


def test_the_admins_file_is_read_only_when_private(tmp_path: Path) -> None:
    path = tmp_path / "reviewers.json"
    ReviewerFile(path).add("alice")
    path.chmod(0o644)
    with pytest.raises(UnsafeFileError, match="lets other accounts read it"):
        ReviewerFile(path).add("bob")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "reviewers", *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_reviewers_command(tmp_path: Path) -> None:
    path = tmp_path / "state" / "reviewers.json"
    added = run_cli("add", "alice", "--file", str(path))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert Reviewers(path).authenticate(token) == "alice"
    assert token not in path.read_text()
    assert run_cli("add", "bob", "--file", str(path)).returncode == 0
    listed = run_cli("list", "--file", str(path))
    assert listed.stdout.splitlines() == ["alice", "bob"]  # names only
    assert "sha256" not in listed.stdout

    again = run_cli("add", "alice", "--file", str(path))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.splitlines() == [
        f"error: name: reviewer 'alice' is already in {path} (remove it to issue a new token)"
    ]
    bad = run_cli("add", "<script>", "--file", str(path))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: name: ")

    removed = run_cli("remove", "alice", "--file", str(path))
    assert removed.returncode == 0
    assert Reviewers(path).authenticate(token) is None
    assert run_cli("list", "--file", str(path)).stdout.splitlines() == ["bob"]
    missing = run_cli("remove", "alice", "--file", str(path))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: name: no reviewer 'alice' in {path}"


def test_a_file_that_disappears_after_reviewers_were_named_lets_no_one_in(tmp_path: Path) -> None:
    """A deleted Secret or a moved file must not bring the shared token back."""
    path = tmp_path / "reviewers.json"
    token = ReviewerFile(path).add("alice")
    reviewers = Reviewers(path)
    assert reviewers.authenticate(token) == "alice"
    path.unlink()
    assert reviewers.authenticate(token) is None
    assert reviewers.any_named()  # the shared token stays refused
    path.write_text(json.dumps({"alice": hash_token(token)}))  # the admin puts it back
    assert reviewers.authenticate(token) == "alice"
