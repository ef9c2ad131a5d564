"""A throwaway nats-server with JetStream: its own ports, store directory and config file.

Debian's `nats-server` (apt-get install nats-server; scripts/setup.sh --test installs it). The config
is written as JSON, which nats-server's config format accepts: a stack's users from
sharedqueue/nats_permissions.py, plus any extra users a test needs. `restart()` keeps the ports and
the store, so streams, consumers and unacknowledged messages survive it as they would in production.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

INSTALL_HINT = "apt-get install nats-server"


class NatsServerMissing(RuntimeError):
    pass


def find_nats_server() -> str:
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NatsServerMissing(f"nats-server is not installed: `{INSTALL_HINT}` (scripts/setup.sh --test does)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    def __init__(self, users: list[dict[str, Any]], *, binary: str | None = None) -> None:
        self.binary = binary or find_nats_server()
        self.dir = Path(tempfile.mkdtemp(prefix="singularity-nats-"))
        self.port = _free_port()
        self.monitor_port = _free_port()
        self.config_file = self.dir / "nats.conf"
        self.log_file = self.dir / "nats.log"
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "http_port": self.monitor_port,
            "jetstream": {"store_dir": str(self.dir / "store"), "max_memory_store": 64 << 20},
            "authorization": {"users": users},
        }
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent=2)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not become healthy in {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _healthy(self) -> bool:
        # /healthz answers 200 only once JetStream is up.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
