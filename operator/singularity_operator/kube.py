"""Applying desired objects with as few API writes as possible: create what is missing, patch what
differs, leave alone what already matches (so an idle reconcile writes nothing). With `listed`, the
live objects can come from a list the caller made (one LIST per kind rather than a GET per object)."""

from __future__ import annotations

import base64
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError


def covers(live: Any, desired: Any) -> bool:
    """Whether `live` already has everything `desired` asks for. The API server adds defaults
    (ports' protocol, strategy details, ...), so extra live fields do not count as a difference."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and covers(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(covers, live, desired))
    return bool(live == desired)


def _secret_matches(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    data = live.get("data") or {}
    wanted = desired.get("stringData") or {}
    return all(data.get(k) == base64.b64encode(v.encode()).decode() for k, v in wanted.items())


class Kube:
    def __init__(self, api_client: ApiClient) -> None:
        self.client = DynamicClient(api_client)

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.client.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()  # type: ignore[no-any-return]
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = self._resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return [item.to_dict() for item in found.items]

    def apply(
        self, desired: dict[str, Any], *, create_only: bool = False, listed: dict[str, dict[str, Any]] | None = None
    ) -> str | None:
        """Make the object match `desired`; returns "created", "updated" or None (already right). `listed`: the
        live objects of its kind by name, from one LIST the caller made (not in it: taken as missing, no GET)."""
        meta = desired["metadata"]
        resource = self._resource(desired["apiVersion"], desired["kind"])
        if listed is None:
            live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta["namespace"])
        else:
            live = listed.get(meta["name"])
        if live is None:
            try:
                resource.create(body=desired, namespace=meta["namespace"])
                return "created"
            except ConflictError:  # there, but not in the list (without the labels it was listed by): compared
                live = self.get(desired["apiVersion"], desired["kind"], meta["name"], meta["namespace"])
                if listed is None or live is None:
                    raise
        if create_only:
            return None
        matches = _secret_matches(live, desired) if desired["kind"] == "Secret" else covers(live, _comparable(desired))
        if matches:
            return None
        resource.patch(
            body=desired, name=meta["name"], namespace=meta["namespace"], content_type="application/merge-patch+json"
        )
        return "updated"

    def delete(self, api_version: str, kind: str, name: str, namespace: str) -> bool:
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace)
        except NotFoundError:
            return False
        return True

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str, status: dict[str, Any]) -> None:
        self._resource(api_version, kind).status.patch(
            body={"status": status}, name=name, namespace=namespace, content_type="application/merge-patch+json"
        )


def _comparable(desired: dict[str, Any]) -> dict[str, Any]:
    """What of `desired` the live object must show: everything but fields the server rewrites."""
    meta = {k: v for k, v in desired["metadata"].items() if k in ("labels", "ownerReferences")}
    return {**{k: v for k, v in desired.items() if k not in ("metadata", "apiVersion", "kind")}, "metadata": meta}
