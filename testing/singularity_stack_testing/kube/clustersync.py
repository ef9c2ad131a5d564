"""What a cloud or an add-on would do for the local node: cluster DNS records and local PersistentVolumes.

Debian has no CoreDNS, so dnsmasq answers cluster names from a hosts file that this loop keeps in step
with Services and Endpoints (no upstream: nothing leaves the machine). And a small pool of local
PersistentVolumes (directories on the node) serves StatefulSets' claims through a default StorageClass;
volumes whose claim is gone are wiped and replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, StorageV1Api
from kubernetes.client.exceptions import ApiException

CLUSTER_DOMAIN = "cluster.local"
STORAGE_CLASS = "local"
FREE_VOLUMES = 3
VOLUME_CAPACITY = "10Gi"
POLL_SECONDS = 1.0

log = logging.getLogger(__name__)


def dns_records(services: Iterable[dict[str, Any]], endpoints: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(ip, name) pairs, as kube-dns answers them: a ClusterIP per Service; for headless Services each ready
    address, plus ``<hostname>.<service>`` for Pods that have a hostname (StatefulSets)."""
    records = []
    headless = set()
    for service in services:
        meta, spec = service["metadata"], service.get("spec") or {}
        name = f"{meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}"
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            records.append((cluster_ip, name))
        elif spec.get("type") != "ExternalName":
            headless.add((meta["namespace"], meta["name"]))
    for endpoint in endpoints:
        meta = endpoint["metadata"]
        if (meta["namespace"], meta["name"]) not in headless:
            continue
        service_name = f"{meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}"
        for subset in endpoint.get("subsets") or []:
            for address in subset.get("addresses") or []:
                records.append((address["ip"], service_name))
                if address.get("hostname"):
                    records.append((address["ip"], f"{address['hostname']}.{service_name}"))
    return sorted(set(records))


def hosts_file(records: list[tuple[str, str]]) -> str:
    return "".join(f"{ip} {name}\n" for ip, name in records)


def storage_class() -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": "kubernetes.io/no-provisioner",
        # Bind when a Pod is scheduled, as local volumes must.
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain",
    }


def local_volume(name: str, path: Path, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"singularity.dev/local-volume": "true"}},
        "spec": {
            "capacity": {"storage": VOLUME_CAPACITY},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}
                    ]
                }
            },
        },
    }


class ClusterSync:
    """A background thread: rewrites dnsmasq's hosts file (and SIGHUPs it) and keeps the volume pool full."""

    def __init__(self, api: ApiClient, hosts_path: Path, volumes_dir: Path, node: str, dnsmasq_pid: int) -> None:
        self.core = CoreV1Api(api)
        self.storage = StorageV1Api(api)
        self.hosts_path = hosts_path
        self.volumes_dir = volumes_dir
        self.node = node
        self.dnsmasq_pid = dnsmasq_pid
        self._next_volume = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="local-node-sync", daemon=True)

    def start(self) -> None:
        self.storage.create_storage_class(storage_class())
        self.sync_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def sync_once(self) -> None:
        self.sync_dns()
        self.sync_volumes()

    def sync_dns(self) -> None:
        api = self.core.api_client
        services = api.sanitize_for_serialization(self.core.list_service_for_all_namespaces().items)
        endpoints = api.sanitize_for_serialization(self.core.list_endpoints_for_all_namespaces().items)
        text = hosts_file(dns_records(services, endpoints))
        with contextlib.suppress(FileNotFoundError):
            if self.hosts_path.read_text() == text:
                return
        self.hosts_path.write_text(text)
        # dnsmasq re-reads its --addn-hosts files on SIGHUP.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.dnsmasq_pid, signal.SIGHUP)

    def sync_volumes(self) -> None:
        volumes = self.core.list_persistent_volume(label_selector="singularity.dev/local-volume=true").items
        free = 0
        for volume in volumes:
            phase = volume.status.phase if volume.status else None
            if phase in ("Released", "Failed"):
                # Its claim is gone: wipe the data, as a real provisioner's Delete policy would.
                with contextlib.suppress(ApiException):
                    self.core.delete_persistent_volume(volume.metadata.name)
                shutil.rmtree(volume.spec.local.path, ignore_errors=True)
            elif phase in (None, "Pending", "Available"):
                free += 1
        for _ in range(FREE_VOLUMES - free):
            self._create_volume()

    def _create_volume(self) -> None:
        while True:
            self._next_volume += 1
            name = f"local-pv-{self._next_volume}"
            path = self.volumes_dir / name
            if not path.exists():
                break
        path.mkdir(parents=True)
        self.core.create_persistent_volume(local_volume(name, path, self.node))

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.sync_once()
            except Exception as exc:  # the API server restarting, a race with a delete: try again next round
                log.warning("local node: DNS/volume sync failed, retrying: %s", exc)
