"""Calico's semantic rules for resources (libcalico-go's validator/v3): what a schema
cannot say, such as CIDRs that parse, AS number ranges, peerIP exclusive with
peerSelector, selectors that parse, ports only with a protocol that has them.

Each rule raises model.ValidationError naming the field, its value and the reason.
Rules that compare a resource with others (pool overlap, immutable fields) are the
writer's (calicoctl/store.py); the structure and types are the CRD schema's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from libcalico.model import (
    NAMESPACED_KINDS,
    IPPool,
    IPReservation,
    Resource,
    SpecResource,
    ValidationError,
)
from libcalico.selector import SelectorError, parse_selector

DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_AS_NUMBER = 4294967295
LOG_LEVELS = ("Trace", "Debug", "Info", "Warning", "Error", "Fatal", "Panic", "None")
PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite")
PORT_PROTOCOLS = ("TCP", "UDP", "SCTP", 6, 17, 132)
_PORT = re.compile(r"^(\d+)(?::(\d+))?$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_COMMUNITY = re.compile(r"^\d+:\d+(:\d+)?$")


def _invalid(path: str, value: Any, reason: str) -> ValidationError:
    return ValidationError(path, reason, value)


def _name(kind: str, name: str) -> None:
    pattern = DNS1123_SUBDOMAIN
    if len(name) > 253 or not pattern.fullmatch(name):
        raise _invalid(
            "metadata.name",
            name,
            "name must consist of lower case alphanumeric characters, '-' or '.', and start "
            "and end with an alphanumeric character",
        )


def _namespace(namespace: str) -> None:
    if not namespace or len(namespace) > 63 or not DNS1123_LABEL.fullmatch(namespace):
        raise _invalid(
            "metadata.namespace",
            namespace,
            "namespace must be a lower case DNS label (letters, digits, '-')",
        )


def _selector(path: str, text: Any) -> None:
    if text in (None, ""):
        return
    try:
        parse_selector(str(text))
    except SelectorError as err:
        raise _invalid(path, text, f"invalid selector: {err}") from err


def _cidr(path: str, text: Any, version: int | None = None, strict: bool = False) -> None:
    """An IP address or CIDR (of `version`, if given); `strict` refuses host bits."""
    try:
        network = ipaddress.ip_network(str(text), strict=strict)
    except ValueError as err:
        raise _invalid(path, text, "must be a valid IP address or CIDR") from err
    if version is not None and network.version != version:
        raise _invalid(path, text, f"must be an IPv{version} address or CIDR")


def _address(path: str, text: Any, version: int | None = None) -> None:
    try:
        address = ipaddress.ip_address(str(text))
    except ValueError as err:
        raise _invalid(path, text, "must be a valid IP address") from err
    if version is not None and address.version != version:
        raise _invalid(path, text, f"must be an IPv{version} address")


def _as_number(path: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_AS_NUMBER:
        raise _invalid(path, value, f"AS number must be between 1 and {MAX_AS_NUMBER}")


def _log_level(path: str, value: Any) -> None:
    if value and str(value).capitalize() not in LOG_LEVELS:
        raise _invalid(path, value, f"log level must be one of {', '.join(LOG_LEVELS)}")


def _peer_ip(path: str, text: str) -> None:
    """`10.0.0.1`, `10.0.0.1:179`, `fd00::1` or `[fd00::1]:179`."""
    host, port = text, None
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:]+):(\d+)", text)
    if match:
        host, port = match.group(1), int(match.group(2))
    try:
        ipaddress.ip_address(host)
    except ValueError as err:
        raise _invalid(path, text, "must be an IP address, optionally with a port") from err
    if port is not None and not 0 < port < 65536:
        raise _invalid(path, text, "port must be between 1 and 65535")


# ------------------------------------------------------------------ per kind


def _node(spec: dict[str, Any]) -> None:
    bgp = spec.get("bgp") or {}
    for name, version in (("ipv4Address", 4), ("ipv6Address", 6)):
        if bgp.get(name):
            _cidr(f"spec.bgp.{name}", bgp[name], version)
    if bgp.get("ipv4IPIPTunnelAddr"):
        _address("spec.bgp.ipv4IPIPTunnelAddr", bgp["ipv4IPIPTunnelAddr"], 4)
    if bgp.get("routeReflectorClusterID"):
        _address("spec.bgp.routeReflectorClusterID", bgp["routeReflectorClusterID"], 4)
    _as_number("spec.bgp.asNumber", bgp.get("asNumber"))
    for name, version in (("ipv4VXLANTunnelAddr", 4), ("ipv6VXLANTunnelAddr", 6)):
        if spec.get(name):
            _address(f"spec.{name}", spec[name], version)
    for name in ("vxlanTunnelMACAddr", "vxlanTunnelMACAddrV6"):
        if spec.get(name) and not _MAC.match(spec[name]):
            raise _invalid(f"spec.{name}", spec[name], "must be a MAC address")


def _bgp_peer(spec: dict[str, Any]) -> None:
    if spec.get("node") and spec.get("nodeSelector"):
        raise _invalid(
            "spec.node", spec["node"], "Node field must be empty when NodeSelector is specified"
        )
    if spec.get("peerIP") and spec.get("peerSelector"):
        raise _invalid(
            "spec.peerIP",
            spec["peerIP"],
            "PeerIP field must be empty when PeerSelector is specified",
        )
    if spec.get("peerSelector") and spec.get("asNumber"):
        raise _invalid(
            "spec.asNumber",
            spec["asNumber"],
            "ASNumber field must be empty when PeerSelector is specified",
        )
    if spec.get("localWorkloadSelector") and (spec.get("peerIP") or spec.get("peerSelector")):
        raise _invalid(
            "spec.localWorkloadSelector",
            spec["localWorkloadSelector"],
            "peerIP and peerSelector must be empty when localWorkloadSelector is specified",
        )
    if spec.get("peerIP"):
        _peer_ip("spec.peerIP", str(spec["peerIP"]))
    _as_number("spec.asNumber", spec.get("asNumber") or None)
    for name in ("nodeSelector", "peerSelector", "localWorkloadSelector"):
        _selector(f"spec.{name}", spec.get(name))
    if spec.get("reachableBy"):
        _address("spec.reachableBy", spec["reachableBy"])


def _bgp_configuration(spec: dict[str, Any]) -> None:
    _as_number("spec.asNumber", spec.get("asNumber"))
    _log_level("spec.logSeverityScreen", spec.get("logSeverityScreen"))
    for name in ("serviceClusterIPs", "serviceExternalIPs", "serviceLoadBalancerIPs"):
        for index, entry in enumerate(spec.get(name) or []):
            _cidr(f"spec.{name}[{index}].cidr", entry.get("cidr"))
    for index, community in enumerate(spec.get("communities") or []):
        if not _COMMUNITY.match(str(community.get("value", ""))):
            raise _invalid(
                f"spec.communities[{index}].value",
                community.get("value"),
                "community must be AA:NN (standard) or AA:NN:MM (large)",
            )
    for index, advertisement in enumerate(spec.get("prefixAdvertisements") or []):
        _cidr(f"spec.prefixAdvertisements[{index}].cidr", advertisement.get("cidr"))


def _config_name(kind: str, name: str) -> None:
    """`default`, or `node.<nodename>` for one node's overrides."""
    if name != "default" and not name.startswith("node."):
        raise _invalid("metadata.name", name, f"{kind} must be named default or node.<nodename>")


def _protocol(path: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 255:
            raise _invalid(path, value, "protocol number must be between 1 and 255")
    elif str(value) not in PROTOCOLS:
        raise _invalid(path, value, f"protocol must be a number or one of {', '.join(PROTOCOLS)}")


def _ports(path: str, ports: list[Any]) -> None:
    for index, port in enumerate(ports):
        match = _PORT.match(str(port))
        if isinstance(port, bool) or match is None:
            if isinstance(port, str) and re.fullmatch(r"[a-zA-Z][-a-zA-Z0-9]*", port):
                continue  # a named port
            raise _invalid(f"{path}[{index}]", port, "port must be a number, a range or a name")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if not 0 <= low <= high <= 65535:
            raise _invalid(f"{path}[{index}]", port, "ports must be between 0 and 65535")


def _entity(path: str, entity: dict[str, Any], protocol: Any) -> None:
    for name in ("nets", "notNets"):
        for index, net in enumerate(entity.get(name) or []):
            _cidr(f"{path}.{name}[{index}]", net)
    for name in ("selector", "notSelector", "namespaceSelector"):
        _selector(f"{path}.{name}", entity.get(name))
    _selector(
        f"{path}.serviceAccounts.selector", (entity.get("serviceAccounts") or {}).get("selector")
    )
    for name in ("ports", "notPorts"):
        ports = entity.get(name)
        if not ports:
            continue
        if protocol not in PORT_PROTOCOLS:
            raise _invalid(
                f"{path}.{name}", ports, "ports are only valid with protocol TCP, UDP or SCTP"
            )
        _ports(f"{path}.{name}", ports)


def _rule(path: str, rule: dict[str, Any]) -> None:
    if rule.get("ipVersion") not in (None, 4, 6):
        raise _invalid(f"{path}.ipVersion", rule["ipVersion"], "ipVersion must be 4 or 6")
    for name in ("protocol", "notProtocol"):
        _protocol(f"{path}.{name}", rule.get(name))
    protocol = rule.get("protocol")
    for name in ("icmp", "notICMP"):
        if rule.get(name) and protocol not in ("ICMP", "ICMPv6", 1, 58):
            raise _invalid(f"{path}.{name}", rule[name], "ICMP fields need protocol ICMP or ICMPv6")
    for side in ("source", "destination"):
        _entity(f"{path}.{side}", rule.get(side) or {}, protocol)


def _policy(spec: dict[str, Any], name: str) -> None:
    tier = spec.get("tier") or "default"
    if "." in name and not name.startswith(f"{tier}."):
        raise _invalid(
            "metadata.name", name, f"a policy name with a '.' must start with its tier ({tier}.)"
        )
    for selector in ("selector", "serviceAccountSelector", "namespaceSelector"):
        _selector(f"spec.{selector}", spec.get(selector))
    types = spec.get("types") or []
    if len(set(types)) != len(types):
        raise _invalid("spec.types", types, "types must not repeat")
    for direction in ("ingress", "egress"):
        if spec.get(direction) and direction.capitalize() not in types:
            raise _invalid(
                "spec.types",
                types,
                f"{direction} rules need {direction.capitalize()} in types",
            )
        for index, rule in enumerate(spec.get(direction) or []):
            _rule(f"spec.{direction}[{index}]", rule)
    if spec.get("doNotTrack") and spec.get("preDNAT"):
        raise _invalid("spec.preDNAT", True, "preDNAT and doNotTrack cannot both be true")
    if (spec.get("doNotTrack") or spec.get("preDNAT")) and not spec.get("applyOnForward"):
        raise _invalid(
            "spec.applyOnForward", False, "must be true when doNotTrack or preDNAT is true"
        )


def _network_set(spec: dict[str, Any]) -> None:
    for index, net in enumerate(spec.get("nets") or []):
        _cidr(f"spec.nets[{index}]", net)


def _kube_controllers(spec: dict[str, Any]) -> None:
    _log_level("spec.logSeverityScreen", spec.get("logSeverityScreen"))
    if spec.get("healthChecks") not in (None, "Enabled", "Disabled"):
        raise _invalid("spec.healthChecks", spec["healthChecks"], "must be Enabled or Disabled")


_SPEC_RULES: dict[str, Callable[[dict[str, Any]], None]] = {
    "Node": _node,
    "BGPPeer": _bgp_peer,
    "BGPConfiguration": _bgp_configuration,
    "NetworkSet": _network_set,
    "GlobalNetworkSet": _network_set,
    "KubeControllersConfiguration": _kube_controllers,
}


def _reservation(reservation: IPReservation) -> None:
    for index, cidr in enumerate(reservation.reserved_cidrs):
        _cidr(f"spec.reservedCIDRs[{index}]", cidr)


def validate(resource: Resource) -> None:
    """Every rule that needs nothing but the resource itself."""
    name = resource.metadata.name
    _name(resource.kind, name)
    if resource.kind in NAMESPACED_KINDS:
        _namespace(resource.metadata.namespace)
    if isinstance(resource, IPPool):
        resource.validate()
    elif isinstance(resource, IPReservation):
        _reservation(resource)
    elif isinstance(resource, SpecResource):
        spec = resource.spec
        if resource.kind in ("BGPConfiguration", "FelixConfiguration"):
            _config_name(resource.kind, name)
        if resource.kind in ("NetworkPolicy", "GlobalNetworkPolicy"):
            _policy(spec, name)
        rule = _SPEC_RULES.get(resource.kind)
        if rule is not None:
            rule(spec)


def default_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """Calico's policy defaults: `types` from the rules present (Ingress when none), and
    every rule with its (empty) source and destination, as Calico stores them."""
    out = dict(spec)
    if not out.get("types"):
        types = [d.capitalize() for d in ("ingress", "egress") if out.get(d)]
        out["types"] = types or ["Ingress"]
    for direction in ("ingress", "egress"):
        if direction in out:
            out[direction] = [
                {
                    **rule,
                    "source": rule.get("source") or {},
                    "destination": rule.get("destination") or {},
                }
                for rule in out[direction] or []
            ]
    return out
