"""Provisioning a stack's databases, roles, queues and schemas."""

from singularity_stack.provision.provisioner import Endpoint, Provisioner, ProvisionError, ProvisionResult

__all__ = ["Endpoint", "ProvisionError", "ProvisionResult", "Provisioner"]
