"""Does a stack's name make valid objects? Checked before anything is written, so a bad name is refused whole.

The API server accepts any DNS subdomain as a SingularityStack's name, but the objects the operator
derives from it are stricter: Service names are DNS-1035 labels (no dots, a letter first, 63 at most);
a StatefulSet's Pods carry `controller-revision-hash: <name>-<hash>`, a label value, so its name may be
at most 52; label values are 63 at most; and PostgreSQL silently cuts identifiers at 63 bytes, which
would make `..._singularity_10` and `..._singularity_100` the same database (names on an external server
carry the namespace and the stack's name as a prefix, so there the namespace counts too). Every rule is checked on
the objects themselves (built by objects.py for the largest spec), so a new object cannot escape it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

from singularity_operator import api, objects
from singularity_stack.topology import StackLayout

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
LABEL_MAX = 63
SUBDOMAIN_MAX = 253
# controller-revision-hash = "<statefulset>-<hash of up to 10 characters>" must fit a label value.
STATEFULSET_MAX = LABEL_MAX - 11
POSTGRES_IDENTIFIER_MAX = 63  # NAMEDATALEN - 1 bytes
# Every object for the most the spec allows: the longest instance names and every optional object.
LARGEST_SPEC: dict[str, Any] = {"singularity": {"replicas": api.MAX_INSTANCES}, "postgres": {"managed": {}}}


def _labels(node: Any) -> Iterator[str]:
    """Every label value in a manifest: metadata, selectors, Pod templates."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("labels", "matchLabels") and isinstance(value, dict):
                yield from (str(v) for v in value.values())
            else:
                yield from _labels(value)
    elif isinstance(node, list):
        for item in node:
            yield from _labels(item)


def _secret_names(stack: str, layout: StackLayout) -> list[str]:
    names = [objects.credentials_secret_name(stack, logical) for logical in layout.owners]
    names += [objects.admin_secret_name(stack), objects.ui_secret_name(stack), objects.reviewers_secret_name(stack)]
    names += [objects.api_token_secret_name(stack, service) for service in ("singularity", "centralcloud")]
    return names


def object_problems(stack: str, namespace: str) -> list[str]:
    """What is wrong with the Kubernetes objects this name makes; empty when they are all valid."""
    spec = api.parse_spec(LARGEST_SPEC)
    problems: list[str] = []
    for manifest in objects.workloads(stack, namespace, spec):
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind == "Service" and not (len(name) <= LABEL_MAX and DNS1035_LABEL.match(name)):
            problems.append(
                f"Service {name!r} would not be a DNS-1035 label (a-z, 0-9, '-', a letter first, 63 at most)"
            )
        elif kind == "StatefulSet" and len(name) > STATEFULSET_MAX:
            problems.append(f"StatefulSet {name!r} would be longer than {STATEFULSET_MAX} (its revision label)")
        elif len(name) > SUBDOMAIN_MAX or not DNS1123_SUBDOMAIN.match(name):
            problems.append(f"{kind} {name!r} would not be a valid name")
        problems += [
            f"label value {value!r} of {kind} {name!r} would be invalid (63 characters at most)"
            for value in _labels(manifest)
            if len(value) > LABEL_MAX or not LABEL_VALUE.match(value)
        ]
    layout = StackLayout(api.MAX_INSTANCES)
    problems += [
        f"Secret {name!r} would not be a valid name"
        for name in _secret_names(stack, layout)
        if len(name) > SUBDOMAIN_MAX or not DNS1123_SUBDOMAIN.match(name)
    ]
    return list(dict.fromkeys(problems))  # one line per problem, in order


def database_problems(stack: str, namespace: str) -> list[str]:
    """Database and role names PostgreSQL would cut short (and so could confuse)."""
    layout = StackLayout(api.MAX_INSTANCES, objects.database_prefix(namespace, stack))
    names = [layout.database(logical) for logical in layout.owners]
    names += [layout.shared_queue_database, layout.analytics_role]
    return [
        f"PostgreSQL name {name!r} would be longer than {POSTGRES_IDENTIFIER_MAX} bytes"
        for name in names
        if len(name.encode()) > POSTGRES_IDENTIFIER_MAX
    ]


def _longest(valid: Callable[[int], bool]) -> int:
    """The largest n in 1..253 with valid(n), for a rule that holds up to some length and not beyond."""
    low, high = 0, SUBDOMAIN_MAX
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if valid(middle) else (low, middle - 1)
    return low


@cache
def longest_object_name() -> int:
    """The longest stack name whose Kubernetes objects are valid, in any namespace (the CRD's maxLength)."""
    return _longest(lambda n: not object_problems("a" * n, "default"))


@cache
def longest_valid(namespace: str, external: bool) -> int:
    """The longest stack name this namespace accepts; on an external server its database names count too."""
    if not external:
        return longest_object_name()
    return min(longest_object_name(), _longest(lambda n: not database_problems("a" * n, namespace)))


@cache
def longest_namespace() -> int:
    """The longest namespace in which a one-letter stack on an external server still fits PostgreSQL's names."""
    return _longest(lambda n: not database_problems("a", "a" * n))


@cache
def name_problem(stack: str, namespace: str, external: bool) -> str | None:
    """One line naming what is wrong with this stack's name, and what would do; None when it is fine."""
    problems = object_problems(stack, namespace) + (database_problems(stack, namespace) if external else [])
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    longest = longest_valid(namespace, external)
    if longest == 0:
        return (
            f"metadata.namespace: {namespace!r} is too long for a stack on an external PostgreSQL: "
            f"{problems[0]}; use a namespace of at most {longest_namespace()} characters"
        )
    return (
        f"metadata.name: {stack!r} cannot be used: {problems[0]}{more}; in namespace {namespace!r} a stack's name "
        f"must be lower-case letters, digits and '-', start with a letter, and be at most {longest} "
        "characters"
    )
