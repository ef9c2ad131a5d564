"""Named reviewers of the HITL UI: a JSON file `{"<name>": "sha256:<hex>"}` holding each token's hash.

Tokens are generated here (32 random bytes from `secrets`), shown once to the admin and never stored.
A fast hash is enough for them: a password needs a slow, salted hash because people pick guessable
ones, but a 256-bit random token cannot be guessed, so its SHA-256 reveals nothing usable and salting
adds nothing. Comparisons are constant-time (`hmac.compare_digest`).

`ReviewerFile` is the admin's side (the CLI: add, remove, list; written with securefile.write_private).
`Reviewers` is Nexus's side: it rereads the file whenever it changes (a stat per lookup), so adding or
removing a reviewer takes effect at the next request, and a file it cannot parse lets no one in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from singularity_stack.securefile import read_private, write_private

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")  # fullmatch
# Letters (any script), digits, space and . @ ' - : shown in the audit trail and to other reviewers.
NAME = re.compile(r"[\w .@'-]{1,64}")  # fullmatch
# Identities Nexus records itself: no reviewer may take them.
SHARED_IDENTITY = "shared-token"
RESERVED = frozenset({SHARED_IDENTITY, "system"})
MAX_FILE_BYTES = 1 << 20


class ReviewersError(Exception):
    """A reviewers file or name that cannot be used; the message is one line for the admin."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name != name.strip():
        raise ReviewersError(f"name: {name!r} is not a reviewer name (letters, digits, spaces and . @ ' -, up to 64)")
    if name in RESERVED:
        raise ReviewersError(f"name: {name!r} is reserved")
    return name


def parse(text: str, source: object) -> dict[str, str]:
    """The {name: hash} of a reviewers file's text, every entry checked."""
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise ReviewersError(f"{source}: not JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(data, dict):
        raise ReviewersError(f'{source}: expected an object {{"<name>": "sha256:<hex>"}}')
    for name, digest in data.items():
        try:
            check_name(name)
        except ReviewersError as error:
            raise ReviewersError(f"{source}: {error}") from None
        if not isinstance(digest, str) or not _HASH.fullmatch(digest):
            raise ReviewersError(f"{source}: {name!r}: expected 'sha256:' and 64 hex digits")
    return data


def lookup(entries: dict[str, str], token: str) -> str | None:
    """The name whose hash is the token's; every entry is compared, in constant time."""
    digest = hash_token(token).encode()
    found = None
    for name, stored in entries.items():
        if hmac.compare_digest(digest, stored.encode()):
            found = name
    return found


# -- the admin's side ---------------------------------------------------------------------------------


@dataclass
class ReviewerFile:
    path: Path

    def read(self) -> dict[str, str]:
        text = read_private(self.path)  # refuses a symlink, another account's file, one others can read
        return {} if text is None else parse(text, self.path)

    def _write(self, entries: dict[str, str]) -> None:
        write_private(self.path, json.dumps(dict(sorted(entries.items())), indent=2, ensure_ascii=False) + "\n")

    def ensure(self) -> None:
        """Create an empty file if there is none (`up`); an existing one is checked, never rewritten."""
        if read_private(self.path) is None:
            self._write({})
        else:
            self.read()

    def add(self, name: str) -> str:
        """Add `name` with a new token; returns the token (its only copy)."""
        entries = self.read()
        if check_name(name) in entries:
            raise ReviewersError(f"name: reviewer {name!r} is already in {self.path} (remove it to issue a new token)")
        token = new_token()
        self._write(entries | {name: hash_token(token)})
        return token

    def remove(self, name: str) -> None:
        entries = self.read()
        if name not in entries:
            raise ReviewersError(f"name: no reviewer {name!r} in {self.path}")
        del entries[name]
        self._write(entries)

    def names(self) -> list[str]:
        return sorted(self.read())


# -- Nexus's side -------------------------------------------------------------------------------------


@dataclass
class Reviewers:
    """The reviewers Nexus accepts, reread when the file changes. No file configured, or none there yet
    (an optional Kubernetes Secret not created): no named reviewers."""

    path: Path | None
    _entries: dict[str, str] = field(default_factory=dict, init=False)
    _seen: tuple[int, int, int, int] | None = field(default=None, init=False)
    _broken: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._refresh(strict=True)  # a bad file at start is an error: Nexus does not start with it

    def _refresh(self, *, strict: bool = False) -> None:
        if self.path is None:
            return
        try:
            # stat follows symlinks: a Kubernetes Secret volume swaps its data directory's link on update.
            info = os.stat(self.path)
        except FileNotFoundError:
            if self._entries or self._broken:
                # Named reviewers existed: a file gone missing must not bring the shared token back.
                if not self._broken:
                    self._fail(f"{self.path} disappeared", strict)
                self._seen = None
                return
            self._entries, self._seen, self._broken = {}, None, False
            return
        except OSError as error:
            self._fail(f"cannot read {self.path}: {error.strerror}", strict)
            return
        seen = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if seen == self._seen:
            return
        try:
            # Not read_private: a Secret volume's file is root's, group-readable. It holds only hashes.
            with open(self.path, "rb") as handle:
                content = handle.read(MAX_FILE_BYTES + 1)
            if len(content) > MAX_FILE_BYTES:
                raise ReviewersError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
            entries = parse(content.decode("utf-8", errors="replace"), self.path)
        except (OSError, ReviewersError) as error:
            self._seen = seen  # reported once per version of the file
            self._fail(str(error), strict)
            return
        if entries.keys() != self._entries.keys() or self._broken:
            log.info("HITL reviewers from %s: %s", self.path, ", ".join(sorted(entries)) or "none")
        self._entries, self._seen, self._broken = entries, seen, False

    def _fail(self, reason: str, strict: bool) -> None:
        if strict:
            raise ReviewersError(reason)
        # Fail closed: a half-edited file must not keep a removed reviewer in.
        log.error("HITL reviewers file unusable, no one can log in until it is fixed: %s", reason)
        self._entries, self._broken = {}, True

    def authenticate(self, token: str) -> str | None:
        """The reviewer `token` belongs to, or None."""
        self._refresh()
        return lookup(self._entries, token) if token else None

    def stored_hash(self, name: str) -> str | None:
        """The current hash of `name`'s token; None once removed (which ends their sessions)."""
        self._refresh()
        return self._entries.get(name)

    def any_named(self) -> bool:
        """True while named reviewers exist, or the file is unusable (then the shared token is refused too)."""
        self._refresh()
        return bool(self._entries) or self._broken
