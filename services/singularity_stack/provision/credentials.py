"""Connection credentials of a stack: what the provisioner writes and the services read.

The file maps each service (and each Singularity instance) to the design's two URLs:
`{"nexus": {"database_url": "...", "shared_queue_url": "..."}, "singularity_1": {...}, ...}`.
CentralCloud also gets `shared_queue_analytics_url`, its read-only connection to the archives.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from singularity_stack.securefile import read_private, write_private


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


def load(path: Path) -> dict[str, ServiceCredentials]:
    text = read_private(path)
    if text is None:
        return {}
    data = json.loads(text)
    return {name: ServiceCredentials.model_validate(entry) for name, entry in data.items()}


def known_passwords(credentials: dict[str, ServiceCredentials]) -> dict[str, str]:
    """Role name → password, from every URL in a credentials file."""
    passwords: dict[str, str] = {}
    for entry in credentials.values():
        for url in (entry.database_url, entry.shared_queue_url, entry.shared_queue_analytics_url):
            if url:
                user, password = url_user_password(url)
                if user and password:
                    passwords[user] = password
    return passwords


def save(path: Path, credentials: dict[str, ServiceCredentials]) -> None:
    """Write the file readable by its owner only, atomically."""
    data = {k: v.model_dump(exclude_none=True) for k, v in credentials.items()}
    write_private(path, json.dumps(data, indent=2) + "\n")
