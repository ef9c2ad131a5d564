"""Two stacks whose database prefixes are equal on one external server: "team-a"/"x" and "team"/"a-x" both
make team_a_x_ (namespace and name joined by '_', '-' made '_'). The second must neither provision into the
first's databases nor, when it is deleted with deletionPolicy Delete, drop them."""

from __future__ import annotations

import psycopg
import pytest

from singularity_operator.objects import database_prefix
from singularity_stack.provision.deprovision import drop_stack
from singularity_stack.provision.provisioner import Provisioner, ProvisionError
from singularity_stack.topology import StackLayout


def test_a_stack_with_the_same_database_names_neither_provisions_nor_drops_the_other(admin_dsn):
    prefix = database_prefix("team-a", "x")
    assert database_prefix("team", "a-x") == prefix  # the names really are the same
    layout = StackLayout(1, prefix)
    first = Provisioner(admin_dsn, layout, report=lambda _: None, owner="team-a/x").run()

    persisted: list[object] = []
    with pytest.raises(ProvisionError) as refused:
        Provisioner(admin_dsn, layout, report=lambda _: None, owner="team/a-x", persist=persisted.append).run()
    assert persisted == []  # not even credentials Secrets for the other stack's names
    assert "belong to stack team-a/x" in str(refused.value) and "nothing was changed" in str(refused.value)
    with pytest.raises(ProvisionError):
        drop_stack(admin_dsn, layout, owner="team/a-x")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        left = {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))}
    assert left == {layout.shared_queue_database, *(layout.database(o) for o in layout.owners)}

    # the stack itself goes on as before, and may drop what is its own
    Provisioner(admin_dsn, layout, report=lambda _: None, owner="team-a/x", known_passwords=first.passwords).run()
    assert f"database {layout.shared_queue_database}" in drop_stack(admin_dsn, layout, owner="team-a/x")
