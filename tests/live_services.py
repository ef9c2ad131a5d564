"""Real service processes (`singularity-stack run <service>`, uvicorn) for tests that talk HTTP to them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from singularity_stack.postgres.cluster import free_port
from singularity_stack.provision.provisioner import ProvisionResult

SINGULARITY_TOKEN = "singularity-api-token-for-tests"
CENTRALCLOUD_TOKEN = "centralcloud-api-token-for-tests"
NEXUS_TOKEN = "nexus-ui-token-for-the-tests"


@dataclass
class LiveService:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        """The server's resident memory (VmRSS), read from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def service_env(result: ProvisionResult, logical: str) -> dict[str, str]:
    creds = result.credentials[logical]
    role = "singularity" if logical.startswith("singularity_") else logical
    env = {
        "DATABASE_URL": creds.database_url,
        "SHARED_QUEUE_DB_URL": creds.shared_queue_url,
        "LOG_LEVEL": "WARNING",
        "HITL_EXPIRY_INTERVAL_SECONDS": "3600",
    }
    if role == "singularity":
        env |= {"SINGULARITY_INSTANCE": logical, "SINGULARITY_API_TOKEN": SINGULARITY_TOKEN}
    if role == "nexus":
        env["NEXUS_UI_TOKEN"] = NEXUS_TOKEN
    if role == "centralcloud":
        env |= {
            "SHARED_QUEUE_ANALYTICS_URL": creds.shared_queue_analytics_url or "",
            "STACK_PREFIX": result.layout.prefix,
            "SINGULARITY_INSTANCES": str(result.layout.instances),
            "CENTRALCLOUD_API_TOKEN": CENTRALCLOUD_TOKEN,
        }
    return env


@contextlib.contextmanager
def live_service(result: ProvisionResult, logical: str, **extra_env: str) -> Iterator[LiveService]:
    """Run one service of a provisioned stack as its own process until the block ends."""
    role = "singularity" if logical.startswith("singularity_") else logical
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"{logical}-", suffix=".log")[1])
    env = {**os.environ, **service_env(result, logical), "HOST": "127.0.0.1", "PORT": str(port), **extra_env}
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "singularity_stack.cli", "run", role], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    service = LiveService(logical, process, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"{logical} exited:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{service.url}/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"{logical} not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)
