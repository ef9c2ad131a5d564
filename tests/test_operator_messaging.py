"""spec.messaging: the operator deploys a stack in dual operation against the platform's nats-server, the NATS
URL and every service's NATS password taken from a Secret by reference (a real kube-apiserver and real
PostgreSQL, the operator in-process; no kubelet: the rendered Deployments, Secrets and NetworkPolicies are
what is checked)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from pydantic import ValidationError
from test_operator_kube import Stacks, cluster, external, namespace, operator  # noqa: F401 (fixtures)

from singularity_operator import api, objects


def env_of(container: Any) -> dict[str, Any]:
    """name → value, or ("secret", name, key) for a reference."""
    found: dict[str, Any] = {}
    for item in container.env:
        ref = item.value_from.secret_key_ref if item.value_from else None
        found[item.name] = ("secret", ref.name, ref.key) if ref else item.value
    return found


def test_a_dual_stack_gets_its_nats_side_from_a_secret(cluster, operator, namespace, pg_cluster):  # noqa: F811
    _, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    stacks.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "nats-users"},
            "stringData": {
                "url": "nats://nats.messaging.svc:4333",
                **{name: f"pw-{name}-0123456789" for name in ("centralcloud", "nexus", "genesis", "singularity_1")},
                "singularity_2": "pw-singularity_2-0123456789",
            },
        },
    )
    messaging = {"mode": "dual", "natsSecret": "nats-users", "natsPort": 4333, "singularityPublishTo": "both"}
    with operator():
        stacks.create("nats", external(pg_cluster, singularity={"replicas": 2}, messaging=messaging))
        stacks.wait_condition("nats", "DatabasesReady", "True")
        deployments = stacks.deployments("nats")
    prefix = f"{namespace}_nats_".replace("-", "_")
    logical = {
        "nats-centralcloud": "centralcloud",
        "nats-nexus": "nexus",
        "nats-genesis": "genesis",
        "nats-singularity-1": "singularity_1",
        "nats-singularity-2": "singularity_2",
    }
    assert sorted(deployments) == sorted(logical)
    for name, service in logical.items():
        env = env_of(deployments[name].spec.template.spec.containers[0])
        assert env["MESSAGING_MODE"] == "dual", name
        assert env["NATS_URL"] == ("secret", "nats-users", "url")
        assert env["NATS_PASSWORD"] == ("secret", "nats-users", service)  # its own user's password, by reference
        assert env["SINGULARITY_INSTANCES"] == "2" and env["STACK_PREFIX"] == prefix
        assert env.get("SINGULARITY_PUBLISH_TO") == ("both" if service.startswith("singularity_") else None)
        # never a password in the Deployment itself
        assert not any("pw-" in str(value) for value in env.values())
    # The passwords stay the admin's: the operator neither copies nor generates a NATS Secret.
    secrets = stacks.all_secrets()
    assert not [name for name, data in secrets.items() if name != "nats-users" and "pw-nexus" in str(data)]
    # The services may reach the nats-server's port (beside PostgreSQL and DNS).
    policies = client.NetworkingV1Api(api_client).list_namespaced_network_policy(namespace).items
    for policy in policies:
        if policy.metadata.name == "nats-postgres":
            continue
        ports = [p.port for rule in policy.spec.egress for p in (rule.ports or []) if not rule.to]
        assert 4333 in ports, policy.metadata.name


def test_a_pgmq_stack_has_no_nats_environment():
    spec = api.StackSpec.model_validate({"postgres": {"managed": {}}})
    for deployment in objects.service_deployments("s", "ns", spec):
        env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert not {"MESSAGING_MODE", "NATS_URL", "NATS_PASSWORD"} & env


def test_a_nats_url_in_the_spec_is_used_as_is_and_its_port_opened():
    spec = api.StackSpec.model_validate(
        {"messaging": {"mode": "cutover", "natsUrl": "nats://nats.example:7422", "natsSecret": "nats-users"}}
    )
    nexus = next(d for d in objects.service_deployments("s", "ns", spec) if d["metadata"]["name"] == "s-nexus")
    env = {e["name"]: e for e in nexus["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NATS_URL"] == {"name": "NATS_URL", "value": "nats://nats.example:7422"}
    assert env["MESSAGING_MODE"]["value"] == "cutover"
    policy = next(p for p in objects.network_policies("s", "ns", spec) if p["metadata"]["name"] == "s-nexus")
    assert {"ports": [{"protocol": "TCP", "port": 7422}]} in policy["spec"]["egress"]


@pytest.mark.parametrize(
    ("messaging", "says"),
    [
        ({"mode": "dual"}, "mode dual needs natsSecret"),
        ({"mode": "cutover", "natsUrl": "nats://n:4222"}, "mode cutover needs natsSecret"),
        ({"mode": "pgmq", "singularityPublishTo": "nats"}, "singularityPublishTo other than pgmq needs mode dual"),
        ({"mode": "dual", "natsSecret": "s", "natsUrl": "http://n:4222"}, "natsUrl"),
        ({"mode": "both"}, "mode"),
    ],
)
def test_a_messaging_spec_that_cannot_work_is_refused_naming_the_field(messaging, says):
    with pytest.raises(ValidationError, match=says):
        api.StackSpec.model_validate({"messaging": messaging})
