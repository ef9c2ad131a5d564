"""`singularity-stack run <service>`: settings from the environment, JSON logs, uvicorn until SIGTERM."""

from __future__ import annotations

import importlib
import os

import uvicorn
from pydantic import ValidationError

from singularity_stack.contract import describe_validation_error
from singularity_stack.service.logs import configure_logging
from singularity_stack.service.runtime import Service
from singularity_stack.service.settings import SettingsError

# service → (module, Service class, Settings class); imported lazily: only the chosen one loads.
ENTRYPOINTS = {
    "singularity": ("singularity_stack.singularity.service", "SingularityService", "SingularitySettings"),
    "nexus": ("singularity_stack.nexus.service", "NexusService", "NexusSettings"),
    "genesis": ("singularity_stack.genesis.service", "GenesisService", "GenesisSettings"),
    "centralcloud": ("singularity_stack.centralcloud.service", "CentralCloudService", "CentralCloudSettings"),
}


def build_service(name: str) -> Service:
    # litellm fetches its model price list from the network on import unless told not to.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    module_name, service_class, settings_class = ENTRYPOINTS[name]
    module = importlib.import_module(module_name)
    try:
        settings = getattr(module, settings_class)()
    except ValidationError as error:
        raise SettingsError(f"{name} cannot start, check its environment: {describe_validation_error(error)}") from None
    configure_logging(name, settings.log_level)
    service: Service = getattr(module, service_class)(settings)
    return service


def run_service(name: str) -> None:
    service = build_service(name)
    uvicorn.run(
        service.app(),
        host=service.settings.host,
        port=service.settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(service.settings.shutdown_grace_seconds) + 5,
    )
