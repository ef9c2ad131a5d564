"""The SingularityStack API: one source of truth (pydantic) for the CRD schema, the chart and the operator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from singularity_operator import api, crd
from singularity_operator import conditions as cond
from singularity_operator.controller import describe_failure

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "charts" / "singularity-stack" / "examples" / "singularitystack.yaml"


def test_crds_folder_and_chart_match_the_models():
    assert (ROOT / "crds" / "singularitystack.yaml").read_text() == crd.crd_yaml(), (
        "run python -m singularity_operator.crd --write"
    )
    assert (ROOT / "charts/singularity-stack/templates/crd.yaml").read_text() == crd.chart_template()


def test_schema_is_structural():
    text = json.dumps(crd.build_crd())
    assert "$ref" not in text and "anyOf" not in text and '"title"' not in text
    assert '"additionalProperties": false' not in text
    version = crd.build_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Replicas", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["singularity"]["properties"]["replicas"]["minimum"] == 1
    assert spec["deletionPolicy"]["enum"] == ["Retain", "Delete"]
    assert spec["deletionPolicy"]["default"] == "Retain"


def test_example_stack_is_valid_and_defaults_are_sane():
    spec = api.parse_spec(yaml.safe_load(EXAMPLE.read_text())["spec"])
    assert spec.singularity.replicas == 2
    assert spec.postgres.managed is not None and spec.postgres.external is None
    assert spec.deletion_policy is api.DeletionPolicy.RETAIN
    assert api.parse_spec({}).postgres.managed is not None  # managed PostgreSQL by default


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"postgres": {}}, "postgres: set exactly one of managed and external"),
        ({"postgres": {"managed": {}, "external": {"host": "db", "adminSecret": {"name": "a"}}}}, "exactly one"),
        ({"singularity": {"replicas": 0}}, "singularity.replicas"),
        ({"deletionPolicy": "Sometimes"}, "deletionPolicy"),
        ({"postgres": {"external": {"host": "db"}}}, "postgres.external.adminSecret"),
        ({"nexus": {"providerKeysSecret": "Not_A_Name"}}, "nexus.providerKeysSecret"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(ValidationError) as raised:
        api.parse_spec(spec)
    from singularity_stack.contract import describe_validation_error

    assert field in describe_validation_error(raised.value)


def test_condition_transition_time_changes_only_with_status():
    first = cond.merge([], [cond.Verdict(cond.DATABASES, False, "Waiting", "x")], 1, at="2026-01-01T00:00:00Z")
    same = cond.merge(first, [cond.Verdict(cond.DATABASES, False, "StillWaiting", "y")], 2, at="2026-01-01T00:05:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("StillWaiting", 2)
    flipped = cond.merge(same, [cond.Verdict(cond.DATABASES, True, "Provisioned")], 2, at="2026-01-01T00:09:00Z")
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_a_condition_without_a_transition_time_gets_one():
    # written by hand (kubectl edit --subresource status), say: the reconcile must not fail on it
    previous = [{"type": cond.DATABASES, "status": "False", "reason": "Waiting"}]
    merged = cond.merge(previous, [cond.Verdict(cond.DATABASES, False, "Waiting")], 1, at="2026-01-01T00:00:00Z")
    assert merged[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_ready_summarises_the_parts():
    parts = [cond.Verdict(t, True, "Ok") for t in cond.PARTS]
    assert cond.summary(parts).ok is True
    parts[3] = cond.Verdict(cond.SERVICES, False, "Unavailable", "waiting for s-nexus")
    ready = cond.summary(parts)
    assert (ready.ok, ready.reason, ready.message) == (False, "Unavailable", "ServicesAvailable: waiting for s-nexus")


def test_a_failure_the_stack_already_shows_is_not_reported_again():
    shown = cond.merge([], [cond.Verdict(cond.DATABASES, False, "PostgresUnreachable", "connection refused")], 1)
    assert cond.already_reported(shown, "PostgresUnreachable", "connection refused")
    assert not cond.already_reported(shown, "PostgresUnreachable", "timeout expired")  # a new failure
    assert not cond.already_reported(shown, "ProvisionFailed", "connection refused")
    healed = cond.merge(shown, [cond.Verdict(cond.DATABASES, True, "PostgresUnreachable", "connection refused")], 1)
    assert not cond.already_reported(healed, "PostgresUnreachable", "connection refused")  # fails again: news


def test_a_failed_reconcile_is_described_in_one_line():
    refused = ApiException(status=403, reason="Forbidden")
    refused.body = json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden", "message": "exceeded quota: two"})
    assert describe_failure(refused) == "403 Forbidden: exceeded quota: two"
    refused.body = "<html>not a Status</html>"  # a proxy's page, say: the exception's own first line
    assert describe_failure(refused) == "ApiException: (403)"
    assert describe_failure(RuntimeError("boom\ntraceback...")) == "RuntimeError: boom"
    assert describe_failure(KeyError()) == "KeyError"
