"""The queue privileges as one GRANT per role and kind of privilege give exactly what a GRANT per table gives."""

from __future__ import annotations

import re

import pytest

from singularity_stack.contract import REQUESTS
from singularity_stack.provision import privileges
from singularity_stack.topology import Access, StackLayout

GRANT = re.compile(r'GRANT (.+) ON (.+) TO ("[^"]+")')


def triples(statements: list) -> list[tuple[str, str, str]]:
    """(privileges, table, role) for every table each statement names, duplicates kept."""
    found = []
    for statement in statements:
        match = GRANT.fullmatch(statement.as_string(None))
        assert match, statement.as_string(None)
        kind, tables, role = match.groups()
        found += [(kind, table, role) for table in tables.split(", ")]
    return found


def per_table(layout: StackLayout) -> list:
    """A GRANT per table, as the provisioner once ran them."""
    replied = set(layout.work_queues) - set(REQUESTS)
    statements = []
    for grant in layout.grants:
        statements += privileges.grant_statements(grant, layout.role(grant.role))
        if grant.access is Access.SEND and grant.queue in replied:
            statements += privileges.reply_archive_statements(grant.queue, layout.role(grant.role))
    for queue in layout.queues:
        statements.append(privileges._statement("SELECT", [f"a_{queue}"], layout.analytics_role))
    return statements


@pytest.mark.parametrize(("instances", "prefix"), [(1, ""), (3, "team_a_x_"), (200, "")])
def test_grouped_grants_are_the_per_table_grants(instances: int, prefix: str) -> None:
    layout = StackLayout(instances, prefix)
    grouped = privileges.queue_statements(layout)
    expected = triples(per_table(layout))
    assert sorted(triples(grouped)) == sorted(set(expected))  # each table once per role and privilege
    assert len(grouped) == len({(kind, role) for kind, _, role in expected})  # one statement per role and kind
