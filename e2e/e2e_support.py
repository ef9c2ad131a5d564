"""Helpers for the end-to-end suite: running tools, talking to the cluster, waiting."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "singularity-stack:0.1.0"
POSTGRES_IMAGE = "singularity-stack-postgres:0.1.0"
OPERATOR_NAMESPACE = "singularity-system"


def run(*args: str, check: bool = True, capture: bool = True, timeout: float = 900) -> str:
    result = subprocess.run(args, capture_output=capture, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout if capture else ""


@dataclass
class Cluster:
    kubeconfig: Path

    def kubectl(self, *args: str, check: bool = True) -> str:
        return run("kubectl", "--kubeconfig", str(self.kubeconfig), *args, check=check)

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def diagnostics(self) -> str:
        """Pod states, events, and the logs of the operator and every service."""
        parts = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False)]
        parts.append(self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False))
        for namespace in (OPERATOR_NAMESPACE, "default"):
            pods = self.kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).split()
            for pod in pods:
                parts.append(f"--- logs {namespace}/{pod} ---")
                parts.append(self.kubectl("logs", "-n", namespace, pod, "--all-containers", "--tail=80", check=False))
        return "\n".join(parts)


def wait_until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(2)
