"""`singularity-stack operator`: run the kopf operator (standalone: one per watched scope)."""

from __future__ import annotations

import asyncio
import os

import kopf

from singularity_stack.service.logs import configure_logging


def run_operator(namespaces: list[str], *, liveness_port: int, metrics_port: int, log_level: str = "INFO") -> None:
    os.environ.setdefault("OPERATOR_METRICS_PORT", str(metrics_port))
    configure_logging("operator", log_level)
    import singularity_operator.handlers  # noqa: F401  (registers the handlers)

    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,  # empty with clusterwide (None crashes kopf 1.45)
            liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz",
        )
    )
