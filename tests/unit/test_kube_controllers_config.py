"""KubeControllersConfiguration as calico-kube-controllers reads it: Go durations, the
node controller's switches, and the environment's overrides."""

from __future__ import annotations

import pytest

from kube_controllers.config import DEFAULT_SPEC, ConfigError, ControllerSettings, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5 m", "m5", "-1s", "1d"])
def test_bad_durations_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^controllers\.node\.leakGracePeriod: .* is not a"):
        ControllerSettings.from_spec({"controllers": {"node": {"leakGracePeriod": text}}}, {})


def test_defaults_written_for_a_missing_configuration() -> None:
    settings = ControllerSettings.from_spec(DEFAULT_SPEC, {})
    assert settings.node_controller and settings.leak_grace == 30.0
    assert settings.reconciler_period == 300.0 and settings.scan_interval == 15.0
    assert settings.log_level == "info"


def test_scan_interval_follows_the_grace_period_within_bounds() -> None:
    def interval(grace: str, period: str = "5m") -> float:
        spec = {"controllers": {"node": {"leakGracePeriod": grace, "reconcilerPeriod": period}}}
        return ControllerSettings.from_spec(spec, {}).scan_interval

    assert interval("4s") == 2.0
    assert interval("1s") == 1.0  # never busier than once a second
    assert interval("1h", "2m") == 120.0
    assert interval("0", "7s") == 7.0  # no leak release: only deleted nodes, each period


def test_node_controller_from_the_spec_or_enabled_controllers() -> None:
    assert not ControllerSettings.from_spec({"controllers": {}}, {}).node_controller
    spec = {"controllers": {"node": {}}}
    assert not ControllerSettings.from_spec(spec, {"ENABLED_CONTROLLERS": "policy"}).node_controller
    env = {"ENABLED_CONTROLLERS": "policy, node"}
    assert ControllerSettings.from_spec({}, env).node_controller


def test_log_level_from_the_spec_or_the_environment() -> None:
    assert ControllerSettings.from_spec({"logSeverityScreen": "Debug"}, {}).log_level == "debug"
    env = {"LOG_LEVEL": "error"}
    assert ControllerSettings.from_spec({"logSeverityScreen": "Debug"}, env).log_level == "error"
