"""Every object the chart renders and the operator builds (all options), validated against the official
schemas of Kubernetes 1.29 through the newest kubernetes-validate ships, strictly: a field a version does
not know is an error, as `kubectl apply --validate=strict` and server-side apply make it.

An object of an API group version a release no longer serves (a batch/v1beta1 CronJob, built for the 1.20
node) is validated as the version that release serves, which is what the operator sends there. Objects of
other projects' CRDs (the Prometheus Operator's) have no official schema and are listed as such.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate import utils
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from singularity_stack_testing import manifests

OLDEST = Version("1.29")
VERSIONS = [v for v in all_versions() if Version(v) >= OLDEST]
NOT_OFFICIAL = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# (kind, apiVersion no longer served) → the one served instead, from the release that removed the old one.
REPLACED = {("CronJob", "batch/v1beta1"): ("batch/v1", Version("1.25"))}

CASES = manifests.all_cases()


@pytest.fixture(autouse=True, scope="module")
def schemas_read_once():
    """kubernetes-validate reads each schema file (the definitions are megabytes) on every call."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents", functools.cache(utils.schema_contents))
        yield


def as_served(manifest: dict[str, Any], version: str) -> dict[str, Any]:
    replacement = REPLACED.get((manifest["kind"], manifest["apiVersion"]))
    if replacement and Version(version) >= replacement[1]:
        return {**copy.deepcopy(manifest), "apiVersion": replacement[0]}
    return manifest


def test_the_versions_span_1_29_to_the_newest_shipped():
    assert VERSIONS[0] == "1.29.0"
    assert Version(VERSIONS[-1]) >= Version("1.37")
    assert sorted(VERSIONS, key=Version) == VERSIONS and len(VERSIONS) >= 9


def test_only_the_prometheus_operators_kinds_lack_an_official_schema():
    kinds = {(m["apiVersion"], m["kind"]) for _, objects in CASES for m in objects}
    assert kinds >= NOT_OFFICIAL  # the monitoring case renders them
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "Secret", "CustomResourceDefinition"} <= {
        kind for _, kind in kinds
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("label", "objects"), CASES, ids=[label for label, _ in CASES])
def test_every_object_is_valid_and_strict(label: str, objects: list[dict[str, Any]], version: str):
    checked = 0
    for manifest in objects:
        if (manifest["apiVersion"], manifest["kind"]) in NOT_OFFICIAL:
            continue
        name = f"{manifest['kind']} {manifest['metadata']['name']}"
        try:
            kubernetes_validate.validate(as_served(manifest, version), version, strict=True)
        except kubernetes_validate.ValidationError as invalid:
            path = ".".join(str(p) for p in invalid.path)
            pytest.fail(f"{label}: {name} is invalid on Kubernetes {version} at {path}: {invalid.message}")
        except kubernetes_validate.SchemaNotFoundError as missing:
            pytest.fail(f"{label}: {name}: {missing.message}")
        checked += 1
    assert checked > 0


def test_strict_validation_refuses_an_unknown_field():
    """What the tests above rely on: a misspelt field fails, in every version."""
    [deployment] = [m for m in manifests.render_chart({}) if m["kind"] == "Deployment"]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfil"] = {"type": "RuntimeDefault"}
    for version in VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)
        with pytest.raises(kubernetes_validate.ValidationError, match="seccompProfil"):
            kubernetes_validate.validate(bad, version, strict=True)


def test_a_cron_job_for_1_20_is_validated_as_batch_v1_where_v1beta1_is_gone():
    cron = {
        "apiVersion": "batch/v1beta1",
        "kind": "CronJob",
        "metadata": {"name": "b", "namespace": "n"},
        "spec": {
            "schedule": "0 3 * * *",
            "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c"}]}}}},
        },
    }
    for version in VERSIONS:
        served = as_served(cron, version)
        assert served["apiVersion"] == "batch/v1"
        kubernetes_validate.validate(served, version, strict=True)
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(cron, version, strict=True)
