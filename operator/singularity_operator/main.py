"""`singularity-stack operator`: run the kopf operator (standalone: one per watched scope)."""

from __future__ import annotations

import asyncio

import kopf

from singularity_operator import handlers
from singularity_operator.config import OperatorConfig
from singularity_stack.service.logs import configure_logging


def run_operator(config: OperatorConfig, namespaces: list[str]) -> None:
    """Run until stopped, watching `namespaces` (empty: every namespace), configured by `config` alone."""
    configure_logging("operator", config.log_level)
    asyncio.run(
        kopf.operator(
            registry=handlers.register(config),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,  # empty with clusterwide (None crashes kopf 1.45)
            liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
        )
    )
