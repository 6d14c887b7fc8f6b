"""The controllers' settings: the KubeControllersConfiguration `default`, and the
environment variables that override it, as calico-kube-controllers reads them.

    spec:
      logSeverityScreen: Info
      controllers:
        node:
          reconcilerPeriod: 5m
          leakGracePeriod: 30s   # how long an unused address is watched before release

Only the node controller (whose IPAM garbage collection this role does) applies here;
the others are accepted and left alone. A missing `default` is created with these
defaults, as kube-controllers does. Calico's default leakGracePeriod is 15m, a margin
for its informer caches; ours re-reads the pod from the API server right before every
release, so 30s keeps a sandbox's leak short without that risk. `0` turns the release of
leaks on live nodes off (kube-controllers' meaning); the addresses of deleted nodes'
gone pods are still released.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from libcalico import durations
from libcalico.datastore.base import AlreadyExists, Datastore, KVPair, NotFound
from libcalico.model import KubeControllersConfiguration, ObjectMeta, ResourceKey

NAME = "default"
KEY = ResourceKey("KubeControllersConfiguration", NAME)
DEFAULT_SPEC: dict[str, Any] = {
    "logSeverityScreen": "Info",
    "healthChecks": "Enabled",
    "etcdV3CompactionPeriod": "10m",
    "controllers": {
        "node": {"reconcilerPeriod": "5m", "syncLabels": "Enabled", "leakGracePeriod": "30s"},
    },
}
DEFAULT_RECONCILER_PERIOD = 300.0
DEFAULT_LEAK_GRACE = 30.0
_LEVELS = {"debug": "debug", "info": "info", "warning": "info", "error": "error", "fatal": "error"}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


def parse_duration(text: str, what: str) -> float:
    """Seconds in a Go duration string, or a ConfigError naming the setting."""
    seconds = durations.parse_duration(text)
    if seconds is None:
        raise ConfigError(f'{what}: "{text.strip()}" is not a duration (e.g. 30s, 5m, 1h)')
    return seconds


@dataclass
class ControllerSettings:
    """What the IPAM garbage collector runs with."""

    node_controller: bool = True
    reconciler_period: float = DEFAULT_RECONCILER_PERIOD
    leak_grace: float = DEFAULT_LEAK_GRACE
    log_level: str = "info"

    @property
    def scan_interval(self) -> float:
        """Half the grace period (kube-controllers' pace), at least 1 s, at most the
        reconciler period: a leak is confirmed on the first scan after its grace ends."""
        if self.leak_grace <= 0:
            return self.reconciler_period
        return min(max(self.leak_grace / 2, 1.0), self.reconciler_period)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], environ: Mapping[str, str]) -> ControllerSettings:
        controllers = spec.get("controllers") or {}
        node = controllers.get("node")
        enabled_env = environ.get("ENABLED_CONTROLLERS")
        if enabled_env is not None:
            node_controller = "node" in {c.strip() for c in enabled_env.split(",")}
        else:
            node_controller = node is not None
        node = node or {}
        level = environ.get("LOG_LEVEL") or spec.get("logSeverityScreen") or "Info"
        return cls(
            node_controller=node_controller,
            reconciler_period=max(
                _duration(node, "reconcilerPeriod", 0) or DEFAULT_RECONCILER_PERIOD, 1.0
            ),
            leak_grace=_duration(node, "leakGracePeriod", DEFAULT_LEAK_GRACE),
            log_level=_LEVELS.get(level.lower(), "info"),
        )


def _duration(section: Mapping[str, Any], name: str, default: float) -> float:
    value = section.get(name)
    return default if value is None else parse_duration(str(value), f"controllers.node.{name}")


def load(store: Datastore, environ: Mapping[str, str]) -> ControllerSettings:
    """Read the `default` configuration, creating it with the defaults when absent."""
    try:
        resource = store.get(KEY).value
    except NotFound:
        resource = KubeControllersConfiguration(ObjectMeta(NAME), dict(DEFAULT_SPEC))
        try:
            store.create(KVPair(KEY, resource))
        except AlreadyExists:
            resource = store.get(KEY).value
    return ControllerSettings.from_spec(resource.spec, environ)
