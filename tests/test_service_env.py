"""`up` gives each service process only the environment it needs: provider keys reach Nexus alone, and a
variable no service reads reaches none of them."""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path

import pytest
from pydantic import AliasChoices

from singularity_stack.genesis.sandbox import PROC_ENV
from singularity_stack.local.supervisor import SET_BY_UP_ENV, SETTINGS_ENV, Supervisor, allowed_env, plan_services
from singularity_stack.provision.credentials import ServiceCredentials
from singularity_stack.securefile import UnsafeFileError
from singularity_stack.service.run import ENTRYPOINTS

UI_TOKEN = "ui-token-for-the-test-0123456789"
# The services' own API tokens, given explicitly (as `up` does) so they start whichever of them need one.
API_TOKENS = {
    "singularity": {"SINGULARITY_API_TOKEN": "singularity-api-token-0123456789"},
    "centralcloud": {"CENTRALCLOUD_API_TOKEN": "centralcloud-api-token-0123456789"},
}
# What `up`'s own environment might hold: process basics, settings for one service, and secrets.
PARENT_ENV = {
    "PATH": os.environ["PATH"],
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "OPENAI_API_KEY": "sk-test",
    "ANTHROPIC_API_KEY": "sk-ant-test",
    "AWS_ACCESS_KEY_ID": "AKIATEST",
    "AWS_SECRET_ACCESS_KEY": "x",
    "SOME_RANDOM_SECRET": "y",
    "DATABASE_URL": "postgresql://someone:else@db.example/theirs",  # up's own database settings win
    "SHARED_QUEUE_URL": "postgresql://someone:else@db.example/queue",
    "HUMAN_TIMEOUT_SECONDS": "120",
    "GENESIS_MAX_CONCURRENT_JOBS": "3",
}
PROVIDER_KEYS = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}  # what the packaged routing config asks for
NOBODY_GETS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SOME_RANDOM_SECRET", "SHARED_QUEUE_URL"}


def fake_credentials(instances: int) -> dict[str, ServiceCredentials]:
    names = ["centralcloud", "nexus", "genesis", *(f"singularity_{i}" for i in range(1, instances + 1))]
    analytics = "postgresql://analytics:pw@127.0.0.1:5432/shared_queue"
    return {
        name: ServiceCredentials(
            database_url=f"postgresql://{name}:pw@127.0.0.1:5432/{name}",
            shared_queue_url=f"postgresql://{name}:pw@127.0.0.1:5432/shared_queue",
            shared_queue_analytics_url=analytics if name == "centralcloud" else None,
        )
        for name in names
    }


def assert_shares(envs: dict[str, dict[str, str]], credentials: dict[str, ServiceCredentials]) -> None:
    for name, env in envs.items():
        assert not NOBODY_GETS & env.keys(), f"{name} got {NOBODY_GETS & env.keys()}"
        assert env["DATABASE_URL"] == credentials[name].database_url
        assert env["PATH"] == PARENT_ENV["PATH"] and env["LC_ALL"] == "C.UTF-8"
        if name == "nexus":
            assert {key: env[key] for key in PROVIDER_KEYS} == {key: PARENT_ENV[key] for key in PROVIDER_KEYS}
        else:
            assert not PROVIDER_KEYS & env.keys(), f"{name} got {PROVIDER_KEYS & env.keys()}"
        assert ("HUMAN_TIMEOUT_SECONDS" in env) == name.startswith("singularity_")
        assert ("GENESIS_MAX_CONCURRENT_JOBS" in env) == (name == "genesis")


def test_the_allow_list_covers_every_setting_each_service_reads() -> None:
    for role, (module_name, _, settings_class) in ENTRYPOINTS.items():
        settings = getattr(importlib.import_module(module_name), settings_class)
        read: set[str] = {PROC_ENV} if role == "genesis" else set()
        for field in settings.model_fields.values():
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            read |= {choice for choice in choices if isinstance(choice, str) and choice.isupper()}
        missing = read - allowed_env(role, {}) - SET_BY_UP_ENV
        assert not missing, f"add {sorted(missing)} to SETTINGS_ENV[{role!r}] in local/supervisor.py"
    assert set(SETTINGS_ENV) == set(ENTRYPOINTS)


def test_the_plan_gives_each_service_only_its_share(tmp_path: Path) -> None:
    credentials = fake_credentials(2)
    plans = plan_services(
        credentials,
        tmp_path,
        instances=2,
        ui_token=UI_TOKEN,
        source_env=PARENT_ENV,
        extra_env={"singularity_2": {"ONLY_FOR_TWO": "2"}, "genesis": {"SOME_RANDOM_SECRET": "given explicitly"}},
    )
    envs = {plan.name: plan.env for plan in plans}
    assert envs["genesis"].pop("SOME_RANDOM_SECRET") == "given explicitly"
    assert_shares(envs, credentials)
    assert envs["nexus"]["NEXUS_UI_TOKEN"] == UI_TOKEN and "NEXUS_UI_TOKEN" not in envs["singularity_1"]
    assert [name for name, env in envs.items() if "ONLY_FOR_TWO" in env] == ["singularity_2"]


def test_provider_keys_are_the_ones_the_routing_config_asks_for(tmp_path: Path) -> None:
    config = tmp_path / "routing.yaml"
    config.write_text(
        "models:\n"
        "  - model_name: bedrock-claude\n"
        "    litellm_params:\n"
        "      {model: bedrock/anthropic.claude-v2, aws_secret_access_key: os.environ/AWS_SECRET_ACCESS_KEY}\n"
        "    requires_env: [AWS_ACCESS_KEY_ID]\n"
        "  - model_name: offline\n"
        "    litellm_params: {model: offline/deterministic}\n"
        "routes:\n"
        "  default: {simple: [bedrock-claude, offline], medium: [offline], complex: [offline]}\n"
    )
    envs = {
        plan.name: plan.env
        for plan in plan_services(
            fake_credentials(1),
            tmp_path,
            instances=1,
            ui_token=UI_TOKEN,
            source_env={**PARENT_ENV, "NEXUS_ROUTING_CONFIG": str(config)},
        )
    }
    assert envs["nexus"]["AWS_SECRET_ACCESS_KEY"] == "x" and envs["nexus"]["AWS_ACCESS_KEY_ID"] == "AKIATEST"
    assert not PROVIDER_KEYS & envs["nexus"].keys()  # this config uses no OpenAI or Anthropic model
    for name, env in envs.items():
        assert "SOME_RANDOM_SECRET" not in env
        assert name == "nexus" or not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & env.keys()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def test_started_services_see_only_their_share_and_still_come_up(
    provision_stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = provision_stack(1)
    for key, value in PARENT_ENV.items():
        monkeypatch.setenv(key, value)
    state = tmp_path / "state"
    plans = plan_services(
        result.credentials,
        state,
        instances=1,
        ui_token=UI_TOKEN,
        prefix=result.layout.prefix,
        extra_env=API_TOKENS,
    )
    supervisor = Supervisor(plans, report=lambda _: None)
    try:
        supervisor.start_all(timeout=120)  # the filtered environment is enough for each to become ready
        envs = {plan.name: environ_of(plan.process.pid) for plan in plans if plan.process}
    finally:
        supervisor.stop_all()
    assert set(envs) == set(result.credentials)
    assert_shares(envs, result.credentials)
    logs = state / "logs"
    assert stat.S_IMODE(logs.lstat().st_mode) == 0o700
    assert {stat.S_IMODE(log.stat().st_mode) for log in logs.iterdir()} == {0o600}


def test_a_planted_log_directory_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "logs").symlink_to(outside, target_is_directory=True)
    [plan, *_] = plan_services(fake_credentials(1), tmp_path / "state", instances=1, ui_token=UI_TOKEN)
    with pytest.raises(UnsafeFileError, match="it is a symbolic link"):
        plan.start()
    assert plan.process is None and list(outside.iterdir()) == []


def test_extra_env_must_name_the_service(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="maps a service"):
        plan_services(
            fake_credentials(1),
            tmp_path,
            instances=1,
            ui_token=UI_TOKEN,
            extra_env={"SINGULARITY_API_TOKEN": "flat, so it would reach no service"},  # type: ignore[dict-item]
        )


def test_extra_workers_run_as_their_service_with_its_database_each_on_a_port_of_its_own(tmp_path):
    plans = plan_services(
        fake_credentials(1), tmp_path / "state", instances=1, ui_token=UI_TOKEN, workers={"nexus": 3, "genesis": 2}
    )
    by_name = {plan.name: plan for plan in plans}
    assert {name for name in by_name if "-" in name} == {"nexus-2", "nexus-3", "genesis-2"}
    for name, service in (("nexus-2", "nexus"), ("nexus-3", "nexus"), ("genesis-2", "genesis")):
        worker, first = by_name[name], by_name[service]
        assert worker.role == service
        assert worker.env["DATABASE_URL"] == first.env["DATABASE_URL"]  # one database and role per service
        assert worker.env["PORT"] != first.env["PORT"]
    assert len({plan.port for plan in plans}) == len(plans)
    assert by_name["nexus-3"].env["NEXUS_UI_TOKEN"] == UI_TOKEN
