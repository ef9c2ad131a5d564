"""Connection credentials of a stack: what the provisioner writes and the services read.

The file maps each service (and each Singularity instance) to the design's two URLs:
`{"nexus": {"database_url": "...", "shared_queue_url": "..."}, "singularity_1": {...}, ...}`.
CentralCloud also gets `shared_queue_analytics_url`, its read-only connection to the archives.

Instances retired by a lower instance count keep their entries under `"retired"`
(`{"retired": {"singularity_3": {...}}}`): their databases and roles stay (as the operator's Retain
policy keeps them), nothing starts them, and raising the count again reuses their passwords. A file
without that key (every file written before it existed) reads as having no retired instance.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from singularity_stack.securefile import read_private, write_private

RETIRED = "retired"  # the key of the retired instances' entries; never a service's name


class ServiceCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: str
    shared_queue_url: str
    shared_queue_analytics_url: str | None = None


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def postgres_url(user: str, password: str, host: str, port: int, dbname: str) -> str:
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(dbname, safe='')}"


def url_user_password(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return unquote(parts.username or ""), unquote(parts.password or "")


@dataclass
class CredentialsFile:
    """What a credentials file holds: the services of the current layout, and the retired instances."""

    active: dict[str, ServiceCredentials] = field(default_factory=dict)
    retired: dict[str, ServiceCredentials] = field(default_factory=dict)

    def everything(self) -> dict[str, ServiceCredentials]:
        return {**self.retired, **self.active}


def read(path: Path) -> CredentialsFile:
    text = read_private(path)
    if text is None:
        return CredentialsFile()
    data = json.loads(text)
    retired = data.pop(RETIRED, None) or {}
    return CredentialsFile(
        {name: ServiceCredentials.model_validate(entry) for name, entry in data.items()},
        {name: ServiceCredentials.model_validate(entry) for name, entry in retired.items()},
    )


def load(path: Path) -> dict[str, ServiceCredentials]:
    """The services of the current layout (never a retired instance)."""
    return read(path).active


def known_passwords(credentials: Mapping[str, ServiceCredentials]) -> dict[str, str]:
    """Role name → password, from every URL in a credentials file."""
    passwords: dict[str, str] = {}
    for entry in credentials.values():
        for url in (entry.database_url, entry.shared_queue_url, entry.shared_queue_analytics_url):
            if url:
                user, password = url_user_password(url)
                if user and password:
                    passwords[user] = password
    return passwords


def retire(previous: CredentialsFile, current: Mapping[str, ServiceCredentials]) -> dict[str, ServiceCredentials]:
    """The retired instances once `current` is the layout: every entry of `previous` not in it."""
    return {name: entry for name, entry in sorted(previous.everything().items()) if name not in current}


def save(
    path: Path,
    credentials: Mapping[str, ServiceCredentials],
    retired: Mapping[str, ServiceCredentials] | None = None,
) -> None:
    """Write the file readable by its owner only, atomically; `retired` under its own key, if any."""
    if RETIRED in credentials:
        raise ValueError(f"{RETIRED!r} is not a service name")
    data: dict[str, object] = {k: v.model_dump(exclude_none=True) for k, v in credentials.items()}
    if retired:
        data[RETIRED] = {k: v.model_dump(exclude_none=True) for k, v in retired.items()}
    write_private(path, json.dumps(data, indent=2) + "\n")
