"""Dropping an instance or a whole stack (deletion policy Delete), on real PostgreSQL."""

from __future__ import annotations

import psycopg

from singularity_stack.provision.deprovision import drop_instance, drop_stack
from singularity_stack.provision.provisioner import Provisioner
from singularity_stack.topology import StackLayout


def exists(admin_dsn: str, query: str, name: str) -> bool:
    with psycopg.connect(admin_dsn) as conn:
        return conn.execute(query, (name,)).fetchone() is not None


DB = "SELECT 1 FROM pg_database WHERE datname = %s"
ROLE = "SELECT 1 FROM pg_roles WHERE rolname = %s"


def test_drop_instance_removes_its_database_role_and_reply_queues_only(admin_dsn):
    result = Provisioner(admin_dsn, StackLayout(3, "dropi_"), report=lambda _: None).run()
    dropped = drop_instance(admin_dsn, result.layout, 3)
    assert "database dropi_singularity_3" in dropped and "role dropi_singularity_3" in dropped
    assert "queue llm_results_singularity_3" in dropped and "queue job_results_singularity_3_dlq" in dropped
    assert not exists(admin_dsn, DB, "dropi_singularity_3") and not exists(admin_dsn, ROLE, "dropi_singularity_3")
    assert exists(admin_dsn, DB, "dropi_singularity_2")
    with psycopg.connect(result.credentials["centralcloud"].shared_queue_url) as conn:
        queues = {r[0] for r in conn.execute("SELECT queue_name FROM pgmq.meta")}
    assert "llm_results_singularity_2" in queues and not any(q.startswith("llm_results_singularity_3") for q in queues)
    # provisioning N=2 afterwards is a no-op; N=3 again recreates the instance from scratch
    again = Provisioner(
        admin_dsn, StackLayout(3, "dropi_"), known_passwords=result.passwords, rotate=[], report=lambda _: None
    )
    assert any(c == "created database dropi_singularity_3" for c in again.run().changes)
    assert drop_instance(admin_dsn, result.layout, 3)  # and it can go again


def test_drop_stack_removes_every_database_and_role(admin_dsn):
    result = Provisioner(admin_dsn, StackLayout(2, "drops_"), report=lambda _: None).run()
    dropped = drop_stack(admin_dsn, result.layout)
    assert len([d for d in dropped if d.startswith("database")]) == 6
    assert len([d for d in dropped if d.startswith("role")]) == 6
    for name in ("drops_shared_queue", "drops_nexus", "drops_singularity_2"):
        assert not exists(admin_dsn, DB, name)
    for name in ("drops_centralcloud", "drops_centralcloud_analytics", "drops_singularity_1"):
        assert not exists(admin_dsn, ROLE, name)
    assert drop_stack(admin_dsn, result.layout) == []  # idempotent
