"""A throwaway, real Kubernetes control plane (etcd + kube-apiserver [+ kube-controller-manager]) for tests.

No kubelet and no scheduler: Pods stay Pending, but everything an operator talks to (CRDs, custom objects
and their /status, RBAC, owner-reference garbage collection, namespace deletion) is the real thing.
The binaries come from scripts/build-kubernetes.sh.
"""

from __future__ import annotations

from .apiserver import Binaries, BinariesMissing, ControlPlane, ControlPlaneError, find_binaries

__all__ = ["Binaries", "BinariesMissing", "ControlPlane", "ControlPlaneError", "find_binaries"]
