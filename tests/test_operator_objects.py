"""The pure functions that build a stack's Kubernetes objects."""

from __future__ import annotations

from singularity_operator import api, objects
from singularity_operator.kube import covers


def by_kind_and_name(manifests):
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def test_workloads_for_three_instances():
    spec = api.parse_spec({"singularity": {"replicas": 3, "image": "registry/singularity:dev"}, "image": "stack:1"})
    built = by_kind_and_name(objects.workloads("demo", "team", spec))
    deployments = sorted(name for kind, name in built if kind == "Deployment")
    instances = [f"demo-singularity-{i}" for i in (1, 2, 3)]
    assert deployments == ["demo-centralcloud", "demo-genesis", "demo-nexus", *instances]
    s2 = built[("Deployment", "demo-singularity-2")]["spec"]["template"]["spec"]
    container = s2["containers"][0]
    assert container["image"] == "registry/singularity:dev" and container["args"] == ["run", "singularity"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SINGULARITY_INSTANCE"]["value"] == "singularity_2"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "demo-singularity-2-db", "key": "DATABASE_URL"}
    assert s2["securityContext"]["runAsNonRoot"] is True and s2["securityContext"]["runAsUser"] == 10001
    nexus = built[("Deployment", "demo-nexus")]["spec"]["template"]["spec"]["containers"][0]
    assert nexus["image"] == "stack:1"
    assert {
        "name": "NEXUS_UI_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "demo-nexus-ui", "key": "NEXUS_UI_TOKEN"}},
    } in nexus["env"]
    genesis = built[("Deployment", "demo-genesis")]["spec"]["template"]["spec"]["containers"][0]
    assert genesis["securityContext"]["seccompProfile"] == {"type": "Unconfined"}  # bubblewrap needs user namespaces
    central = {
        e["name"]: e
        for e in built[("Deployment", "demo-centralcloud")]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert central["SINGULARITY_INSTANCES"]["value"] == "3"
    assert central["STACK_PREFIX"]["value"] == ""  # a managed server belongs to this stack alone
    assert ("StatefulSet", "demo-postgres") in built and ("Service", "demo-singularity-3") in built


def test_http_apis_get_their_tokens_and_answer_only_to_their_own_names():
    spec = api.parse_spec({"singularity": {"replicas": 2}})
    built = by_kind_and_name(objects.workloads("demo", "team", spec))

    def env_of(name: str) -> list[dict]:
        return built[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]["env"]

    def token_refs(name: str) -> dict[str, dict]:
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env_of(name) if e["name"].endswith("_API_TOKEN")}

    for instance in ("demo-singularity-1", "demo-singularity-2"):
        assert token_refs(instance) == {
            "SINGULARITY_API_TOKEN": {"name": "demo-singularity-api", "key": "SINGULARITY_API_TOKEN"}
        }
    assert token_refs("demo-centralcloud") == {
        "CENTRALCLOUD_API_TOKEN": {"name": "demo-centralcloud-api", "key": "CENTRALCLOUD_API_TOKEN"}
    }
    assert token_refs("demo-nexus") == token_refs("demo-genesis") == {}  # no one else holds them
    for name in ("demo-singularity-2", "demo-nexus", "demo-genesis", "demo-centralcloud"):
        env = env_of(name)
        names = [e["name"] for e in env]
        # POD_IP comes first: Kubernetes expands $(POD_IP) only from variables defined before it.
        assert names.index("POD_IP") < names.index("ALLOWED_HOSTS")
        assert env[names.index("POD_IP")]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        hosts = env[names.index("ALLOWED_HOSTS")]["value"].split(",")
        assert hosts == [
            name,
            f"{name}.team",
            f"{name}.team.svc",
            f"{name}.team.svc.cluster.local",
            "$(POD_IP)",
            "localhost",
            "127.0.0.1",
        ]


def test_external_postgres_prefixes_databases_and_allows_only_its_port():
    spec = api.parse_spec(
        {"postgres": {"external": {"host": "db.example", "port": 6543, "adminSecret": {"name": "pg-admin"}}}}
    )
    built = by_kind_and_name(objects.workloads("demo", "team-a", spec))
    assert ("StatefulSet", "demo-postgres") not in built
    central = {
        e["name"]: e
        for e in built[("Deployment", "demo-centralcloud")]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert central["STACK_PREFIX"]["value"] == "team_a_demo_"
    genesis_policy = built[("NetworkPolicy", "demo-genesis")]["spec"]
    assert genesis_policy["egress"][0] == {"ports": [{"protocol": "TCP", "port": 6543}]}


def test_network_policies_give_each_service_only_what_it_needs():
    spec = api.parse_spec({})
    policies = {m["metadata"]["name"]: m["spec"] for m in objects.network_policies("demo", "ns", spec)}
    to_postgres = {
        "to": [{"podSelector": {"matchLabels": objects.selector("demo", "postgres")}}],
        "ports": [{"protocol": "TCP", "port": 5432}],
    }
    assert policies["demo-genesis"]["egress"] == [to_postgres, objects.DNS]  # no other egress: not even HTTPS
    assert policies["demo-singularity"]["egress"] == [to_postgres, objects.DNS]
    assert {"ports": [{"protocol": "TCP", "port": 443}]} in policies["demo-nexus"]["egress"]
    assert policies["demo-postgres"]["egress"] == []
    assert all(set(p["policyTypes"]) == {"Ingress", "Egress"} for p in policies.values())


def test_managed_postgres_statefulset_fixes_volume_ownership():
    spec = api.parse_spec({"postgres": {"managed": {"storage": "5Gi", "storageClassName": "fast"}}})
    postgres = objects.managed_postgres("demo", "ns", spec)[0]
    pod = postgres["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    claim = postgres["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "demo-postgres-admin"


def test_routing_config_and_provider_keys_reach_nexus():
    spec = api.parse_spec(
        {"nexus": {"routingConfigMap": {"name": "routes", "key": "routing.yaml"}, "providerKeysSecret": "llm-keys"}}
    )
    nexus = by_kind_and_name(objects.service_deployments("demo", "ns", spec))[("Deployment", "demo-nexus")]["spec"][
        "template"
    ]["spec"]
    container = nexus["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "llm-keys", "optional": True}}]
    assert {"name": "NEXUS_ROUTING_CONFIG", "value": "/etc/singularity/routing/routing.yaml"} in container["env"]
    assert {"name": "routing", "configMap": {"name": "routes"}} in nexus["volumes"]
    assert {"name": "routing", "mountPath": "/etc/singularity/routing", "readOnly": True} in container["volumeMounts"]
    assert len(nexus["volumes"]) == 2  # and the reviewers' Secret, as without a routing config


def test_nexus_reads_its_named_reviewers_from_a_secret_volume():
    for spec in (
        api.parse_spec({}),
        api.parse_spec({"nexus": {"routingConfigMap": {"name": "routes", "key": "r.yaml"}}}),
    ):
        pod = by_kind_and_name(objects.service_deployments("demo", "ns", spec))[("Deployment", "demo-nexus")]["spec"][
            "template"
        ]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["NEXUS_REVIEWERS_FILE"] == {
            "name": "NEXUS_REVIEWERS_FILE",
            "value": "/etc/singularity/reviewers/reviewers.json",
        }
        # The whole Secret, not a subPath (kubelet updates only whole volumes), optional (Nexus starts
        # before the admin names anyone) and readable by the pod's group alone (fsGroup).
        assert {
            "name": "reviewers",
            "secret": {"secretName": "demo-nexus-reviewers", "optional": True, "defaultMode": 0o440},
        } in pod["volumes"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "reviewers"]
        assert mount == {"name": "reviewers", "mountPath": "/etc/singularity/reviewers", "readOnly": True}
        assert pod["securityContext"]["fsGroup"] == objects.SERVICE_UID
    for name in ("demo-genesis", "demo-centralcloud", "demo-singularity-1"):
        other = by_kind_and_name(objects.service_deployments("demo", "ns", api.parse_spec({})))[("Deployment", name)]
        assert "NEXUS_REVIEWERS_FILE" not in {
            e["name"] for e in other["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert "volumes" not in other["spec"]["template"]["spec"]


def test_covers_ignores_server_defaults_but_not_differences():
    desired = {"spec": {"ports": [{"port": 80}], "selector": {"a": "b"}}}
    live = {"spec": {"ports": [{"port": 80, "protocol": "TCP"}], "selector": {"a": "b"}, "clusterIP": "198.19.0.3"}}
    assert covers(live, desired)
    assert not covers(live, {"spec": {"ports": [{"port": 81}]}})
    assert not covers(live, {"spec": {"ports": [{"port": 80}, {"port": 81}]}})


def test_every_service_pod_first_applies_its_own_images_migrations_as_its_role():
    """A new stack or instance on a newer image gets that image's schema, not the operator's: each pod's
    init container runs `singularity-stack migrate <service>` from the pod's image with its database URL."""
    from singularity_operator import migration_jobs

    spec = api.parse_spec({"image": "stack:2", "genesis": {"image": "genesis:3"}, "singularity": {"replicas": 2}})
    seen = {}
    for deployment in objects.service_deployments("s", "ns", spec):
        pod = deployment["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        logical = migration_jobs.logical_of(deployment)
        assert init["image"] == pod["containers"][0]["image"]
        [url] = init["env"]
        secret = objects.credentials_secret_name("s", logical)
        assert url == {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": "DATABASE_URL"}}}
        assert init["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        seen[logical] = (init["image"], init["args"])
        # An upgrade held back until its migration Job succeeded holds the init container back too.
        held = migration_jobs.with_image(deployment, "stack:1")["spec"]["template"]["spec"]
        assert held["initContainers"][0]["image"] == held["containers"][0]["image"] == "stack:1"
    assert seen == {
        "centralcloud": ("stack:2", ["migrate", "centralcloud"]),
        "nexus": ("stack:2", ["migrate", "nexus"]),
        "genesis": ("genesis:3", ["migrate", "genesis"]),
        "singularity_1": ("stack:2", ["migrate", "singularity"]),
        "singularity_2": ("stack:2", ["migrate", "singularity"]),
    }
