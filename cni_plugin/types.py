"""CNI errors and results, and conversion between the seven spec versions.

A result is held internally in the 1.1.0 shape and converted on output, the way
libcni's `types100` is the one in-memory type; `parse_result` accepts any version.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"
# A config without cniVersion is 0.1.0, as libcni and skel decode it.
DEFAULT_VERSION = "0.1.0"

# Error codes of the spec (section "Error"), plus the Go library's 8 and 999.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_INVALID_NETNS = 8
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_INTERNAL = 999

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CNIError(Exception):
    """An error that is printed as the spec's error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}; {self.details}" if self.details else self.msg

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_tuple(version: str) -> tuple[int, int, int]:
    """Parse a semantic version; CNIError code 6 when it is not one (as libcni decodes it)."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CNIError(ERR_DECODE, "decoding version info", f'invalid version "{version}"')
    major, minor, patch = (int(p) for p in parts)
    return major, minor, patch


def version_at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)


@dataclass
class Interface:
    name: str
    mac: str = ""
    mtu: int = 0
    sandbox: str = ""
    socket_path: str = ""
    pci_id: str = ""


@dataclass
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None
    mtu: int = 0
    advmss: int = 0
    priority: int = 0
    table: int | None = None
    scope: int | None = None


@dataclass
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out


@dataclass
class Result:
    """A CNI result in the 1.1.0 model."""

    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)

    def to_version(self, version: str) -> dict[str, Any]:
        """The JSON document for `version`, following libcni's conversion rules."""
        vt = version_tuple(version)
        if vt < (0, 3, 0):
            return self._to_020(version)
        return self._to_current(version, with_ip_version=vt < (1, 0, 0))

    def _to_current(self, version: str, with_ip_version: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [
                _interface_dict(i, full=not with_ip_version) for i in self.interfaces
            ]
        ips = []
        for ipc in self.ips:
            entry: dict[str, Any] = {}
            if with_ip_version:
                entry["version"] = str(ipc.address.version)
            if ipc.interface is not None:
                entry["interface"] = ipc.interface
            entry["address"] = str(ipc.address)
            if ipc.gateway is not None:
                entry["gateway"] = str(ipc.gateway)
            ips.append(entry)
        if ips:
            out["ips"] = ips
        if self.routes:
            out["routes"] = [_route_dict(r) for r in self.routes]
        if with_ip_version or not self.dns.is_empty():
            out["dns"] = self.dns.to_dict()
        return out

    def _to_020(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version}
        for family, key in ((4, "ip4"), (6, "ip6")):
            ipc = next((i for i in self.ips if i.address.version == family), None)
            if ipc is None:
                continue
            entry: dict[str, Any] = {"ip": str(ipc.address)}
            if ipc.gateway is not None:
                entry["gateway"] = str(ipc.gateway)
            routes = [
                {"dst": str(r.dst), **({"gw": str(r.gw)} if r.gw is not None else {})}
                for r in self.routes
                if r.dst.version == family
            ]
            if routes:
                entry["routes"] = routes
            out[key] = entry
        if "ip4" not in out and "ip6" not in out:
            raise CNIError(ERR_INTERNAL, "cannot convert: no valid IP addresses")
        out["dns"] = self.dns.to_dict()
        return out


def _interface_dict(iface: Interface, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": iface.name}
    if iface.mac:
        out["mac"] = iface.mac
    if full and iface.mtu:
        out["mtu"] = iface.mtu
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    if full and iface.socket_path:
        out["socketPath"] = iface.socket_path
    if full and iface.pci_id:
        out["pciID"] = iface.pci_id
    return out


def _route_dict(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": str(route.dst)}
    if route.gw is not None:
        out["gw"] = str(route.gw)
    for key, value in (("mtu", route.mtu), ("advmss", route.advmss), ("priority", route.priority)):
        if value:
            out[key] = value
    if route.table is not None:
        out["table"] = route.table
    if route.scope is not None:
        out["scope"] = route.scope
    return out


def parse_result(data: Any, version: str) -> Result:
    """Parse a result (an IPAM plugin's output or a prevResult) given in `version`.

    Raises CNIError code 6 when the document is not a result of that version.
    """
    try:
        if not isinstance(data, dict):
            raise ValueError("result is not a JSON object")
        if version_tuple(version) < (0, 3, 0):
            return _parse_020(data)
        return _parse_current(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CNIError(ERR_DECODE, f"failed to parse a version {version} result", str(exc)) from exc


def _parse_current(data: dict[str, Any]) -> Result:
    result = Result()
    for raw in data.get("interfaces") or []:
        result.interfaces.append(
            Interface(
                name=raw["name"],
                mac=raw.get("mac", ""),
                mtu=int(raw.get("mtu", 0)),
                sandbox=raw.get("sandbox", ""),
                socket_path=raw.get("socketPath", ""),
                pci_id=raw.get("pciID", ""),
            )
        )
    for raw in data.get("ips") or []:
        gateway = raw.get("gateway")
        result.ips.append(
            IPConfig(
                address=ipaddress.ip_interface(raw["address"]),
                gateway=ipaddress.ip_address(gateway) if gateway else None,
                interface=raw.get("interface"),
            )
        )
    result.routes = [_parse_route(r) for r in data.get("routes") or []]
    result.dns = _parse_dns(data.get("dns"))
    return result


def _parse_020(data: dict[str, Any]) -> Result:
    result = Result()
    for key in ("ip4", "ip6"):
        raw = data.get(key)
        if not raw:
            continue
        gateway = raw.get("gateway")
        result.ips.append(
            IPConfig(
                address=ipaddress.ip_interface(raw["ip"]),
                gateway=ipaddress.ip_address(gateway) if gateway else None,
            )
        )
        result.routes.extend(_parse_route(r) for r in raw.get("routes") or [])
    result.dns = _parse_dns(data.get("dns"))
    return result


def _parse_route(raw: dict[str, Any]) -> Route:
    gw = raw.get("gw")
    return Route(
        dst=ipaddress.ip_network(raw["dst"], strict=False),
        gw=ipaddress.ip_address(gw) if gw else None,
        mtu=int(raw.get("mtu", 0)),
        advmss=int(raw.get("advmss", 0)),
        priority=int(raw.get("priority", 0)),
        table=raw.get("table"),
        scope=raw.get("scope"),
    )


def _parse_dns(raw: Any) -> DNS:
    if not raw:
        return DNS()
    return DNS(
        nameservers=list(raw.get("nameservers") or []),
        domain=raw.get("domain") or "",
        search=list(raw.get("search") or []),
        options=list(raw.get("options") or []),
    )
