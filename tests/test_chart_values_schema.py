"""The chart's values.schema.json, enforced by Helm's own engine (helm_python): a typo or a bad value fails
`helm lint` and rendering (what `helm template` and `helm install` do) with a message naming it, and the
schema knows every value the templates read, and no value values.yaml lacks."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from singularity_stack_testing import manifests

CHART = manifests.CHART
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"imge": {"tag": "1.0"}}, "at '': additional properties 'imge' not allowed"),
    ({"operator": {"logLevl": "DEBUG"}}, "at '/operator': additional properties 'logLevl' not allowed"),
    ({"operator": {"logLevel": "verbose"}}, "at '/operator/logLevel'"),
    ({"operator": {"metricsPort": "9090"}}, "at '/operator/metricsPort': got string, want integer"),
    ({"operator": {"livenessPort": 70000}}, "at '/operator/livenessPort'"),
    ({"crds": {"create": "yes"}}, "at '/crds/create': got string, want boolean"),
    ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
    ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
    ({"image": {"pullPolicy": "always"}}, "at '/image/pullPolicy'"),
    ({"serviceAccount": {"nmae": "x"}}, "at '/serviceAccount': additional properties 'nmae' not allowed"),
    ({"resources": {"limit": {"memory": "1Gi"}}}, "at '/resources': additional properties 'limit' not allowed"),
    ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
    ({"monitoring": {"podMonitor": {"enabled": True}}}, "additional properties 'podMonitor' not allowed"),
    ({"monitoring": {"podMonitors": {"interval": "30 seconds"}}}, "at '/monitoring/podMonitors/interval'"),
    ({"monitoring": {"rules": {"taskFailureRatio": 20}}}, "at '/monitoring/rules/taskFailureRatio'"),
    ({"monitoring": {"dashboard": {"labels": {"grafana_dashboard": 1}}}}, "at '/monitoring/dashboard/labels/"),
]


def render(values: dict[str, Any]) -> dict[str, str]:
    rendered: dict[str, str] = helm.Chart.load(str(CHART)).render(
        values, name="ops", namespace="operators", is_install=True
    )
    return rendered


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_a_bad_value_fails_rendering_and_lint_naming_it(values: dict[str, Any], message: str):
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert "values don't meet the specifications of the schema" in str(refused.value)
    assert message in str(refused.value)
    report = helm.lint(str(CHART), values, strict=True)
    assert any(message in error for error in report["errors"]), report["errors"]


@pytest.mark.parametrize("label", sorted(manifests.CHART_VALUES))
def test_the_defaults_and_the_documented_combinations_pass(label: str):
    values = manifests.CHART_VALUES[label]
    assert render(values)
    assert helm.lint(str(CHART), values, strict=True)["errors"] == []


def schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Every dotted path the schema spells out (objects with properties of their own)."""
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= schema_paths(sub, f"{path}.")
    return paths


def value_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        paths.add(f"{prefix}{key}")
        # Kubernetes objects taken whole (resources, podSecurityContext, ...) stop here: they are not ours.
        if isinstance(value, dict) and value and f"{prefix}{key}" not in OPAQUE:
            paths |= value_paths(value, f"{prefix}{key}.")
    return paths


# Values that are Kubernetes objects or maps of the user's own keys: checked by type, not key by key.
OPAQUE = {
    "podSecurityContext",
    "resources.requests",
    "resources.limits",
    "nodeSelector",
    "affinity",
    "monitoring.podMonitors.labels",
    "monitoring.rules.labels",
    "monitoring.dashboard.labels",
}


def test_every_default_is_in_the_schema_and_every_schema_key_has_a_default():
    documented = schema_paths(SCHEMA)
    defaults = value_paths(DEFAULTS)
    assert defaults <= documented, defaults - documented
    # beyond values.yaml: a parent chart's `global`, and ResourceRequirements' own keys
    assert documented - defaults == {"global", "resources.claims"}


def test_every_value_a_template_reads_is_in_the_schema():
    read = set()
    for template in (CHART / "templates").iterdir():
        read |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()))
    assert read, "the templates read values"
    assert read <= schema_paths(SCHEMA), read - schema_paths(SCHEMA)


def test_every_known_object_refuses_unknown_keys():
    def strict(schema: dict[str, Any], path: str) -> list[str]:
        loose = []
        if schema.get("properties") and schema.get("additionalProperties") is not False:
            loose.append(path or "(top level)")
        for key, sub in schema.get("properties", {}).items():
            loose += strict(sub, f"{path}.{key}".lstrip("."))
        return loose

    assert strict(SCHEMA, "") == []


def documented_values(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Each value the chart README's table lists: leaves, and the opaque objects whole."""
    found = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in OPAQUE:
            found |= documented_values(value, f"{path}.")
        else:
            found[path] = value
    return found


def test_the_chart_readme_lists_every_value_with_its_default():
    rows = {}
    for line in (CHART / "README.md").read_text().splitlines():
        if match := re.match(r"^\| `([^`]+)` \| `([^`]*)` \|", line):
            rows[match[1]] = match[2]
    expected = {path: json.dumps(value) for path, value in documented_values(DEFAULTS).items()}
    assert rows == expected
