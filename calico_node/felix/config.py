"""Felix's settings: FELIX_* environment variables over FelixConfiguration `node.<name>`
over FelixConfiguration `default` over Felix's defaults (Felix's own precedence).

The environment is the operator's: a bad value there stops the daemon at start with one
line naming the variable. The resources are anyone's with datastore access, and change
while the daemon runs: a bad value there is logged once and the next source wins.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from calico_node.config import ConfigError
from libcalico.durations import parse_duration

log = logging.getLogger("felix")

# Felix's default mtuIfacePattern: the interfaces whose MTU is the host's.
DEFAULT_MTU_IFACE_PATTERN = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
NAT_EXCLUSIONS = ("IPPoolsOnly", "IPPoolsAndHostIPs")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("is not a boolean")


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("is not a number")
        number = int(str(value).strip())
        if not low <= number <= high:
            raise ValueError(f"is out of range {low}..{high}")
        return number

    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        parsed = parse_duration(str(value))
        if parsed is None:
            raise ValueError("is not a duration (e.g. 90s)")
        seconds = parsed
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


def _pattern(value: Any) -> str:
    re.compile(str(value))
    return str(value)


def _address(value: Any) -> str:
    import ipaddress

    return str(ipaddress.ip_address(str(value).strip()))


def _port_range(value: Any) -> str:
    match = re.fullmatch(r"(\d+)(?:[-:](\d+))?", str(value).strip())
    if not match:
        raise ValueError("is not a port range (e.g. 32768-65535)")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 1 <= low <= high <= 65535:
        raise ValueError("is not a port range within 1-65535")
    return f"{low}-{high}" if high != low else str(low)


def _one_of(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        for choice in allowed:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"is not one of {', '.join(allowed)}")

    return parse


def _interface_filter(value: Any) -> str:
    """An interface name for iptables' `-o`, `+` as a trailing wildcard (`eth+`)."""
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}\+?", text):
        raise ValueError("is not an interface name (letters, digits, _.:-, optional trailing +)")
    return text


@dataclass(frozen=True)
class Param:
    attr: str  # FelixConfig's attribute
    field: str  # FelixConfiguration spec field
    parse: Callable[[Any], Any]
    env_name: str = ""  # when it is not FELIX_ + the field upper-cased

    @property
    def env(self) -> str:
        return self.env_name or "FELIX_" + self.field.upper()


@dataclass(frozen=True)
class FelixConfig:
    vxlan_enabled: bool | None = None  # None: from the pools
    vxlan_vni: int = 4096
    vxlan_port: int = 4789
    vxlan_mtu: int = 0  # 0: host MTU - 50
    vxlan_mtu_v6: int = 0  # 0: host MTU - 70
    ipip_enabled: bool | None = None
    ipip_mtu: int = 0  # 0: host MTU - 20
    mtu_iface_pattern: str = DEFAULT_MTU_IFACE_PATTERN
    route_refresh_interval: float = 90.0
    iptables_refresh_interval: float = 90.0
    device_route_protocol: int = 3
    ipv6_support: bool = True
    nat_outgoing_address: str = ""
    nat_port_range: str = ""
    nat_outgoing_exclusions: str = "IPPoolsOnly"
    nat_outgoing_interface_filter: str = ""

    @property
    def felix_route_protocol(self) -> int:
        """Felix's protocol for blackholes and same-subnet routes: 80 unless the device
        route protocol was moved off boot (3), then that one (calico-node.md §2.1)."""
        return 80 if self.device_route_protocol == 3 else self.device_route_protocol

    @property
    def refresh_interval(self) -> float:
        return min(self.route_refresh_interval, self.iptables_refresh_interval)

    @classmethod
    def resolve(
        cls,
        env: Mapping[str, str],
        default: Mapping[str, Any],
        per_node: Mapping[str, Any],
        warned: set[str] | None = None,
    ) -> FelixConfig:
        """The settings in force: env > `node.<name>` > `default` > Felix's defaults.
        `warned` collects the resource problems already logged (each is logged once)."""
        values: dict[str, Any] = {}
        for param in PARAMS:
            raw = env.get(param.env, "").strip()
            if raw:
                try:
                    values[param.attr] = param.parse(raw)
                except ValueError as err:
                    raise ConfigError(f"{param.env}={raw!r} {err}") from None
                continue
            for source, spec in (("node", per_node), ("default", default)):
                if spec.get(param.field) in (None, ""):
                    continue
                try:
                    values[param.attr] = param.parse(spec[param.field])
                    break
                except (ValueError, re.error) as err:
                    problem = f"FelixConfiguration {source} {param.field}={spec[param.field]!r}"
                    if warned is None or problem not in warned:
                        log.warning("ignoring %s: %s", problem, err)
                        if warned is not None:
                            warned.add(problem)
        return cls(**values)


PARAMS = (
    Param("vxlan_enabled", "vxlanEnabled", _bool),
    Param("vxlan_vni", "vxlanVNI", _int_in(1, 2**24 - 1)),
    Param("vxlan_port", "vxlanPort", _int_in(1, 65535)),
    Param("vxlan_mtu", "vxlanMTU", _int_in(0, 65535)),
    Param("vxlan_mtu_v6", "vxlanMTUV6", _int_in(0, 65535)),
    Param("ipip_enabled", "ipipEnabled", _bool, "FELIX_IPINIPENABLED"),
    Param("ipip_mtu", "ipipMTU", _int_in(0, 65535), "FELIX_IPINIPMTU"),
    Param("mtu_iface_pattern", "mtuIfacePattern", _pattern),
    Param("route_refresh_interval", "routeRefreshInterval", _seconds),
    Param("iptables_refresh_interval", "iptablesRefreshInterval", _seconds),
    Param("device_route_protocol", "deviceRouteProtocol", _int_in(1, 255)),
    Param("ipv6_support", "ipv6Support", _bool),
    Param("nat_outgoing_address", "natOutgoingAddress", _address),
    Param("nat_port_range", "natPortRange", _port_range),
    Param("nat_outgoing_exclusions", "natOutgoingExclusions", _one_of(*NAT_EXCLUSIONS)),
    Param("nat_outgoing_interface_filter", "iptablesNATOutgoingInterfaceFilter", _interface_filter),
)
