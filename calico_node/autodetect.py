"""The node's address by Calico's autodetection methods (IP_AUTODETECTION_METHOD).

`first-found`, `interface=`, `skip-interface=`, `can-reach=`, `cidr=` and
`kubernetes-internal-ip` behave as in calico-node (calico-node.md §3.3), and the result
keeps the interface's prefix length (`192.168.10.26/24`): the prefix is what later tells
same-subnet peers from the others. Interfaces are read with pyroute2, in index order.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calico_node.config import ConfigError

log = logging.getLogger("autodetect")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# autodetection_linux.go: interfaces first-found never picks.
DEFAULT_EXCLUDES = (
    r"^docker.*",
    r"^cbr.*",
    r"^dummy.*",
    r"^podman.*",
    r"^virbr.*",
    r"^lxcbr.*",
    r"^veth.*",
    r"^lo",
    r"^br-.*",
    r"^cali.*",
    r"^tunl.*",
    r"^flannel.*",
    r"^kube-ipvs.*",
    r"^cni.*",
    r"^vxlan\.calico.*",
    r"^vxlan-v6\.calico.*",
    r"^wireguard\.cali.*",
    r"^wg-v6\.cali.*",
    r"^nodelocaldns.*",
)


@dataclass(frozen=True)
class HostInterface:
    name: str
    addresses: tuple[IPInterface, ...]


@dataclass(frozen=True)
class Detected:
    address: IPInterface
    interface: str
    method: str


def host_interfaces() -> list[HostInterface]:
    """Every interface of this netns with its addresses, in index order."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found: dict[int, list[IPInterface]] = {index: [] for index in names}
        for addr in ipr.get_addr():
            text = addr.get_attr("IFA_ADDRESS")
            if text and addr["index"] in found:
                found[addr["index"]].append(ipaddress.ip_interface(f"{text}/{addr['prefixlen']}"))
    return [HostInterface(names[i], tuple(found[i])) for i in sorted(names)]


def _usable(address: IPInterface, version: int) -> bool:
    """Go's IsGlobalUnicast, which private ranges pass."""
    ip = address.ip
    return ip.version == version and not (
        ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip.is_link_local
        or ip == ipaddress.IPv4Address("255.255.255.255")
    )


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    try:
        return [re.compile(p) for p in patterns if p]
    except re.error as err:
        raise ConfigError(f"{what}: invalid interface regex: {err}") from None


def _first(
    interfaces: list[HostInterface],
    version: int,
    include: Callable[[str], bool],
    inside: Callable[[IPInterface], bool] = lambda a: True,
) -> tuple[IPInterface, str] | None:
    for iface in interfaces:
        if not include(iface.name):
            continue
        for address in iface.addresses:
            if _usable(address, version) and inside(address):
                return address, iface.name
    return None


def _with_prefix(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, interfaces: list[HostInterface]
) -> tuple[IPInterface, str]:
    """The interface address `ip` is, with its prefix; /32 (/128) when no interface has it."""
    for iface in interfaces:
        for address in iface.addresses:
            if address.ip == ip:
                return address, iface.name
    return ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}"), ""


def _can_reach(
    destination: str, version: int, interfaces: list[HostInterface]
) -> tuple[IPInterface, str] | None:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        infos = socket.getaddrinfo(destination, 80, family, socket.SOCK_DGRAM)
    except OSError as err:
        raise ConfigError(f"can-reach={destination}: cannot resolve: {err}") from None
    # A UDP "connection" sends nothing; the kernel picks the source it would route from.
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(infos[0][4])
        except OSError as err:
            log.warning("can-reach=%s: no route: %s", destination, err)
            return None
        local = ipaddress.ip_address(sock.getsockname()[0])
    return _with_prefix(local, interfaces)


def detect(
    method: str,
    version: int,
    interfaces: list[HostInterface] | None = None,
    kubernetes_internal_ip: Callable[[], str] | None = None,
) -> Detected | None:
    """The address `method` picks, or None when none qualifies; ConfigError for a method
    Calico does not know."""
    method = method.strip() or "first-found"
    interfaces = host_interfaces() if interfaces is None else interfaces
    kind, _, arg = method.partition("=")
    found: tuple[IPInterface, str] | None
    if method == "first-found":
        excludes = _compile(DEFAULT_EXCLUDES, method)
        found = _first(interfaces, version, lambda n: not any(r.match(n) for r in excludes))
    elif kind == "interface" and arg:
        includes = _compile(arg.split(","), method)
        found = _first(interfaces, version, lambda n: any(r.match(n) for r in includes))
    elif kind == "skip-interface" and arg:
        excludes = _compile([*DEFAULT_EXCLUDES, *arg.split(",")], method)
        found = _first(interfaces, version, lambda n: not any(r.match(n) for r in excludes))
    elif kind == "can-reach" and arg:
        found = _can_reach(arg, version, interfaces)
    elif kind == "cidr" and arg:
        try:
            networks = [ipaddress.ip_network(c.strip(), strict=False) for c in arg.split(",")]
        except ValueError as err:
            raise ConfigError(f"IP autodetection method {method!r}: {err}") from None
        found = _first(
            interfaces, version, lambda n: True, lambda a: any(a.ip in net for net in networks)
        )
    elif method == "kubernetes-internal-ip" and kubernetes_internal_ip is not None:
        text = kubernetes_internal_ip()
        found = _with_prefix(ipaddress.ip_address(text), interfaces) if text else None
    else:
        raise ConfigError(f"Invalid IP autodetection method: {method!r}")
    if found is None:
        return None
    return Detected(found[0], found[1], method)


def complete_prefix(text: str, interfaces: list[HostInterface] | None = None) -> IPInterface:
    """`IP=<address or CIDR>`: a bare address gets its interface's prefix (/32 otherwise)."""
    try:
        if "/" in text:
            return ipaddress.ip_interface(text)
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(
            f"IP={text!r} is not an address, a CIDR, 'autodetect' or 'none'"
        ) from None
    return _with_prefix(ip, host_interfaces() if interfaces is None else interfaces)[0]
