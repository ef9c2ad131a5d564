"""`up --messaging dual|cutover --nats-url URL`: the stack's side of an existing nats-server.

`up` does not run nats-server: in the migration from NATS it is the one the platform runs today. It keeps
every service's NATS password in the state directory (0600, generated once, as the database credentials
are) and writes the nats-server `authorization` block those users need (sharedqueue/nats_permissions.py)
beside it, for nats-server's config to `include`.
"""

from __future__ import annotations

import json
from pathlib import Path

from singularity_stack.local import lifecycle
from singularity_stack.local.supervisor import Messaging
from singularity_stack.provision.credentials import generate_password
from singularity_stack.securefile import read_private, write_private
from singularity_stack.sharedqueue import nats_permissions
from singularity_stack.topology import StackLayout

PASSWORDS_FILE = "nats-passwords.json"
AUTHORIZATION_FILE = "nats-authorization.conf"
MODES = ("pgmq", "dual", "cutover")


def check(mode: str, nats_url: str | None) -> None:
    """Refuse a mode and URL that do not go together, in one line (before anything is started)."""
    if mode not in MODES:
        raise lifecycle.UpError(f"--messaging {mode}: one of {', '.join(MODES)}")
    if mode == "pgmq" and nats_url:
        raise lifecycle.UpError("--nats-url needs --messaging dual or cutover")
    if mode != "pgmq" and not (nats_url or "").startswith(("nats://", "tls://")):
        raise lifecycle.UpError(f"--messaging {mode} needs --nats-url nats://HOST:PORT (the platform's nats-server)")


def passwords(state: Path, layout: StackLayout) -> dict[str, str]:
    """Each service's and instance's NATS password: kept ones, a new one for any without."""
    path = state / PASSWORDS_FILE
    try:
        kept = json.loads(read_private(path) or "{}")
    except ValueError:
        kept = {}
    known = {name: value for name, value in kept.items() if isinstance(value, str) and len(value) >= 16}
    every = {logical: known.get(logical) or generate_password() for logical in layout.owners}
    if every != kept:
        write_private(path, json.dumps({**known, **every}, indent=2))  # instances dropped now keep theirs
    return every


def authorization(layout: StackLayout, secrets: dict[str, str]) -> str:
    """nats-server config text: `authorization: {users: [...]}` (JSON is nats-server's config syntax too)."""
    users = nats_permissions.users(layout, secrets)
    return (
        "# The singularity stack's NATS users (singularity-stack up): include this file in nats-server's config.\n"
        + ("authorization: " + json.dumps({"users": users}, indent=2) + "\n")
    )


def messaging(state: Path, layout: StackLayout, mode: str, nats_url: str | None) -> tuple[Messaging, Path | None]:
    """The services' messaging settings for `mode`, and the authorization file written (None in pgmq mode)."""
    check(mode, nats_url)
    if mode == "pgmq" or not nats_url:
        return Messaging(), None
    secrets = passwords(state, layout)
    path = state / AUTHORIZATION_FILE
    write_private(path, authorization(layout, secrets))
    return Messaging(mode, nats_url, secrets), path
