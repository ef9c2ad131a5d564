"""The operator's settings: one object, from the environment and the command's flags, errors in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from singularity_operator import handlers
from singularity_operator.config import OperatorConfig, OperatorConfigError

VARIABLES = ("KUBECONFIG", "LOG_LEVEL", "HEALTH_INTERVAL_SECONDS", "OPERATOR_METRICS_PORT", "OPERATOR_LIVENESS_PORT")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_charts() -> None:
    config = OperatorConfig.load()
    assert config.kubeconfig is None
    assert config.log_level == "INFO"
    assert config.health_interval_seconds == 30.0
    assert (config.metrics_port, config.liveness_port) == (9090, 8080)


def test_read_from_the_environment_and_flags_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("HEALTH_INTERVAL_SECONDS", "2.5")
    monkeypatch.setenv("OPERATOR_METRICS_PORT", "0")
    monkeypatch.setenv("OPERATOR_LIVENESS_PORT", "8181")
    config = OperatorConfig.load(metrics_port=None, liveness_port=9999)  # None: the flag was not given
    assert config.kubeconfig == kubeconfig
    assert config.log_level == "DEBUG"
    assert config.health_interval_seconds == 2.5
    assert (config.metrics_port, config.liveness_port) == (0, 9999)


def test_an_empty_kubeconfig_means_the_service_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "")
    assert OperatorConfig.load().kubeconfig is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("HEALTH_INTERVAL_SECONDS", "0", "HEALTH_INTERVAL_SECONDS: Input should be greater than 0 (got '0')"),
        ("HEALTH_INTERVAL_SECONDS", "soon", "HEALTH_INTERVAL_SECONDS: Input should be a valid number"),
        ("OPERATOR_METRICS_PORT", "70000", "OPERATOR_METRICS_PORT: Input should be less than or equal to 65535"),
        ("OPERATOR_LIVENESS_PORT", "0", "OPERATOR_LIVENESS_PORT: Input should be greater than or equal to 1"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
        ("KUBECONFIG", "/nonexistent/kubeconfig", "KUBECONFIG: Path does not point to a file"),
    ],
)
def test_bad_settings_are_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(OperatorConfigError) as raised:
        OperatorConfig.load()
    text = str(raised.value)
    assert text.startswith("operator settings: ") and message in text
    assert "\n" not in text


def test_every_error_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTH_INTERVAL_SECONDS", "-1")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    with pytest.raises(OperatorConfigError, match=r"LOG_LEVEL: .*; HEALTH_INTERVAL_SECONDS: "):
        OperatorConfig.load()


def test_the_command_prints_one_line_for_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    cli = Path(sys.executable).with_name("singularity-stack")
    monkeypatch.setenv("HEALTH_INTERVAL_SECONDS", "0")
    done = subprocess.run([str(cli), "operator", "--all-namespaces"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: operator settings: HEALTH_INTERVAL_SECONDS: Input should be greater than 0 (got '0')"
    ]


def test_the_registry_is_built_from_the_config_and_nothing_at_import() -> None:
    registry = handlers.register(OperatorConfig(health_interval_seconds=7))
    timers = [h for h in registry._spawning.get_all_handlers() if getattr(h, "interval", None) is not None]
    assert [(h.id, h.interval, h.initial_delay) for h in timers] == [("check_health_and_drift", 7, 7)]
    changing = {h.id for h in registry._changing.get_all_handlers()}
    assert changing == {"reconcile", "delete"}
    assert {h.id for h in registry._activities.get_all_handlers()} == {"login", "configure"}
