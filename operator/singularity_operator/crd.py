"""The CustomResourceDefinition, generated from the pydantic models in `api.py`.

    python -m singularity_operator.crd --write    # crds/ and the Helm chart's template


Kubernetes wants a *structural* schema: no `$ref`, `nullable` instead of `anyOf [x, null]`, and no
`additionalProperties` beside `properties` (unknown fields are pruned by the API server instead).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from singularity_operator import api, naming

DROPPED_KEYS = {"title"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    any_of = node.get("anyOf")
    if any_of and {"type": "null"} in any_of:
        others = [option for option in any_of if option != {"type": "null"}]
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
        merged = _structural({**others[0], **rest}, defs) if len(others) == 1 else {"anyOf": others, **rest}
        return {**merged, "nullable": True}
    result = {}
    for key, value in node.items():
        if key in DROPPED_KEYS or key == "$defs":
            continue
        if key == "additionalProperties" and value is False:
            continue  # structural schemas prune unknown fields instead
        if key == "default" and value in ("", [], {}):
            continue  # Kubernetes 1.20 reads an empty default as null and refuses the CRD
        if key == "properties":
            result[key] = {name: _structural(schema, defs) for name, schema in value.items()}
        else:
            result[key] = _structural(value, defs)
    return result


# What api.py's model validators check that a structural schema cannot, as CEL rules
# (x-kubernetes-validations) on the model's schema: Kubernetes >= 1.25 enforces them itself (422 on a
# create or update). Older API servers drop the field, but their OpenAPI does not know it, so kubectl's and
# Helm's client-side validation refuse the CRD there: the chart's template leaves the rules out below 1.25
# (the operator's own check remains), and crds/ (plain YAML) is for 1.25 and newer.
CEL_SINCE = "1.25"
CEL_RULES: dict[str, list[dict[str, str]]] = {
    api.PostgresSpec.__name__: [
        {"rule": "has(self.managed) != has(self.external)", "message": "set exactly one of managed and external"}
    ],
    api.GenesisSeccomp.__name__: [
        {
            "rule": "(has(self.type) && self.type == 'Localhost') == has(self.localhostProfile)",
            "message": "localhostProfile is set exactly when type is Localhost",
        }
    ],
}


def _with_cel_rules(schema: dict[str, Any], cel: bool) -> dict[str, Any]:
    defs = schema.get("$defs", {})
    for name, rules in CEL_RULES.items() if cel else ():
        if name in defs:
            defs[name] = {**defs[name], "x-kubernetes-validations": rules}
    return schema


def model_schema(model: type[api.Model], cel: bool = True) -> dict[str, Any]:
    schema = _with_cel_rules(model.model_json_schema(by_alias=True, mode="validation"), cel)
    structural: dict[str, Any] = _structural(schema, schema.get("$defs", {}))
    return structural


def build_crd(cel: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.singularity.replicas"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A singularity-stack: its databases, queues and four services.",
                            "properties": {
                                # The one restriction a CRD may put on metadata: names whose objects would be
                                # invalid are refused by the API server itself (naming.py; an external server's
                                # database names, which depend on the namespace, are checked by the operator).
                                "metadata": {
                                    "type": "object",
                                    "properties": {
                                        "name": {
                                            "type": "string",
                                            "maxLength": naming.longest_object_name(),
                                            "pattern": naming.DNS1035_LABEL.pattern,
                                        }
                                    },
                                },
                                "spec": model_schema(api.StackSpec, cel),
                                "status": model_schema(api.StackStatus),
                            },
                            "required": ["spec"],
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `python -m singularity_operator.crd --write` from operator/singularity_operator/api.py.\n"
REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "singularitystack.yaml"
CHART_TEMPLATE = REPO / "charts" / "singularity-stack" / "templates" / "crd.yaml"


def crd_yaml(cel: bool = True) -> str:
    return HEADER + yaml.safe_dump(build_crd(cel), sort_keys=False, width=120)


def chart_template() -> str:
    """The same CRD as a chart template behind `crds.create` (Helm never upgrades a chart's crds/ folder),
    with its CEL rules where the cluster (Helm's .Capabilities) is new enough to know them."""
    return (
        "{{- if .Values.crds.create }}\n"
        + f'{{{{- if semverCompare ">={CEL_SINCE}-0" .Capabilities.KubeVersion.Version }}}}\n'
        + crd_yaml()
        + "{{- else }}\n"
        + crd_yaml(cel=False)
        + "{{- end }}\n{{- end }}\n"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        CRD_FILE.write_text(crd_yaml())
        CHART_TEMPLATE.write_text(chart_template())
        print(f"wrote {CRD_FILE} and {CHART_TEMPLATE}")
    else:
        sys.stdout.write(crd_yaml())
