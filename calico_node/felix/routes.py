"""The main-table routes Felix owns, kept equal to the model's (calico-node.md §2.4, §2.9).

Owned, and so removed when not wanted: routes with Felix's protocol (80, or the device
route protocol when it is not boot) and every route on Felix's devices (the VXLAN devices,
tunl0 when Felix programs IPIP), except the kernel's own (`proto kernel`). Everything else
(BIRD's `proto bird` routes, the CNI's `/32 dev cali*` routes) is left alone, unless it
sits exactly where a Felix route must be, which `replace` then takes over.

Missing and changed routes go out as one netlink batch; when the kernel refused some, it is
read back and what is still wrong retried one by one, so an error names the route and the
kernel's reason.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyroute2.netlink.rtnl.rtmsg import rtmsg

from calico_node.felix import netlink
from calico_node.felix.model import Route
from calico_node.felix.netlink import IPRoute, Link, NetlinkError
from libcalico.model import IPNetwork

log = logging.getLogger("felix")

RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTPROT_BIRD = 12
DEFAULT_METRIC = {4: 0, 6: 1024}  # what the kernel records for a route given none
LOG_EACH_UP_TO = 20


class RouteError(Exception):
    """Routes the kernel refused; the message names them and why."""


@dataclass(frozen=True)
class KernelRoute:
    route: Route
    metric: int
    owned: bool


def _kernel_routes(
    ipr: IPRoute, version: int, names: Mapping[int, str], felix_proto: int, owned: Iterable[str]
) -> list[KernelRoute]:
    owned_devices = set(owned)
    found = []
    for msg in ipr.get_routes(family=netlink.FAMILY[version]):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        kind = msg["type"]
        if table != netlink.RT_TABLE_MAIN or kind not in (
            netlink.RTN_UNICAST,
            netlink.RTN_BLACKHOLE,
        ):
            continue
        dst_text = msg.get_attr("RTA_DST") or ("0.0.0.0" if version == 4 else "::")
        dst = ipaddress.ip_network(f"{dst_text}/{msg['dst_len']}")
        gateway = msg.get_attr("RTA_GATEWAY")
        blackhole = kind == netlink.RTN_BLACKHOLE
        device = "" if blackhole else names.get(msg.get_attr("RTA_OIF") or -1, "?")
        route = Route(
            dst,
            ipaddress.ip_address(gateway) if gateway else None,
            device,
            onlink=bool(msg["flags"] & netlink.RTNH_F_ONLINK),
            protocol=msg["proto"],
        )
        is_owned = msg["proto"] != netlink.RTPROT_KERNEL and (
            msg["proto"] == felix_proto or device in owned_devices
        )
        found.append(KernelRoute(route, msg.get_attr("RTA_PRIORITY") or 0, is_owned))
    return found


def _message(route: Route, indexes: Mapping[str, int], add: bool, metric: int = 0) -> rtmsg:
    msg = rtmsg()
    msg["family"] = netlink.FAMILY[route.dst.version]
    msg["dst_len"] = route.dst.prefixlen
    msg["table"] = netlink.RT_TABLE_MAIN
    msg["proto"] = route.protocol
    msg["type"] = netlink.RTN_BLACKHOLE if route.blackhole else netlink.RTN_UNICAST
    device_route = not route.blackhole and route.gateway is None
    msg["scope"] = netlink.RT_SCOPE_LINK if device_route else netlink.RT_SCOPE_UNIVERSE
    msg["flags"] = netlink.RTNH_F_ONLINK if route.onlink else 0
    attrs: list[tuple[str, object]] = [("RTA_TABLE", netlink.RT_TABLE_MAIN)]
    if route.dst.prefixlen:
        attrs.append(("RTA_DST", str(route.dst.network_address)))
    if route.gateway is not None:
        attrs.append(("RTA_GATEWAY", str(route.gateway)))
    if not route.blackhole:
        attrs.append(("RTA_OIF", indexes[route.device]))
    if not add:
        attrs.append(("RTA_PRIORITY", metric))
    msg["attrs"] = attrs
    return netlink.request(msg, RTM_NEWROUTE if add else RTM_DELROUTE, replace=add)


class RouteManager:
    """Keeps what it last read from or wrote to the kernel: a pass with `resync` False (the
    kernel did not change behind its back, the refresh is not due) plans against that and
    sends only the difference; reading 1,000 routes back costs ~200 ms in pyroute2 here."""

    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr
        self._programmed: set[Route] = set()  # what we put in place and saw there since
        self._known: dict[int, list[KernelRoute]] = {}  # per family: the kernel, as we know it

    def apply(
        self,
        desired: Mapping[int, Mapping[IPNetwork, Route]],
        links: Mapping[str, Link],
        felix_proto: int,
        owned_devices: Iterable[str],
        resync: bool = True,
    ) -> list[str]:
        """Converge every family in `desired`; returns what was fixed (for the log)."""
        indexes = {link.name: link.index for link in links.values()}
        names = {index: name for name, index in indexes.items()}
        owned = tuple(owned_devices)
        fixed: list[str] = []
        errors: list[str] = []
        for version, routes in desired.items():
            wanted = {dst: r for dst, r in routes.items() if r.blackhole or r.device in indexes}
            errors += [
                f"{r}: device {r.device} does not exist"
                for r in routes.values()
                if r.dst not in wanted
            ]
            if resync or version not in self._known:
                self._known[version] = _kernel_routes(self.ipr, version, names, felix_proto, owned)
            changes, notes = self._plan(version, wanted, self._known[version], indexes)
            fixed += notes
            if changes and netlink.send_batch(self.ipr, changes) < len(changes):
                errors += self._verify(version, wanted, indexes, names, felix_proto, owned)
            else:
                self._known[version] = self._after(version, wanted, self._known[version])
            self._programmed |= set(wanted.values())
        if errors:
            self._known.clear()
            more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
            raise RouteError("; ".join(errors[:5]) + more)
        return fixed

    @staticmethod
    def _stale(k: KernelRoute, wanted: Mapping[IPNetwork, Route], metric: int) -> bool:
        return k.owned and (k.route.dst not in wanted or k.metric != metric)

    def _after(
        self, version: int, wanted: Mapping[IPNetwork, Route], known: list[KernelRoute]
    ) -> list[KernelRoute]:
        """The kernel once the plan went through: stale routes gone, the wanted in place."""
        metric = DEFAULT_METRIC[version]
        kept = [
            k
            for k in known
            if not self._stale(k, wanted, metric)
            and not (k.metric == metric and k.route.dst in wanted)
        ]
        return kept + [KernelRoute(r, metric, True) for r in wanted.values()]

    def _plan(
        self,
        version: int,
        wanted: Mapping[IPNetwork, Route],
        current: list[KernelRoute],
        indexes: Mapping[str, int],
    ) -> tuple[list[rtmsg], list[str]]:
        metric = DEFAULT_METRIC[version]
        in_place = {k.route.dst: k.route for k in current if k.metric == metric}
        changes: list[rtmsg] = []
        removed: list[str] = []
        for k in current:
            if self._stale(k, wanted, metric):
                changes.append(_message(k.route, indexes, add=False, metric=k.metric))
                removed.append(str(k.route))
        restored: list[str] = []
        added = 0
        for dst, route in wanted.items():
            if in_place.get(dst) == route:
                continue
            changes.append(_message(route, indexes, add=True))
            if route in self._programmed:
                have = in_place.get(dst)
                restored.append(f"{route} (was {have})" if have else f"{route} (was missing)")
            else:
                added += 1
        notes = []
        if len(removed) + len(restored) <= LOG_EACH_UP_TO:
            notes += [f"removed stale route {r}" for r in removed]
            notes += [f"restored route {r}" for r in restored]
        else:
            notes.append(f"removed {len(removed)} stale routes, restored {len(restored)}")
        if added:
            notes.append(f"programmed {added} IPv{version} routes")
        return changes, notes

    def _verify(
        self,
        version: int,
        wanted: Mapping[IPNetwork, Route],
        indexes: Mapping[str, int],
        names: Mapping[int, str],
        felix_proto: int,
        owned: tuple[str, ...],
    ) -> list[str]:
        """Some requests failed: read back, retry what is still wrong one at a time for the
        kernel's reason."""
        metric = DEFAULT_METRIC[version]
        current = _kernel_routes(self.ipr, version, names, felix_proto, owned)
        in_place = {k.route.dst: k.route for k in current if k.metric == metric}
        errors = []
        for dst, route in wanted.items():
            if in_place.get(dst) == route:
                continue
            try:
                self.ipr.nlm_request_batch([_message(route, indexes, add=True)])
            except NetlinkError as err:
                errors.append(f"{route}: {netlink.describe(err)}")
        return errors


def remove_owned(
    ipr: IPRoute, links: Mapping[str, Link], protocols: set[int], owned: Iterable[str]
) -> int:
    """Uninstall: every route on `owned` devices or with one of `protocols`, in both
    families; returns how many."""
    indexes = {link.name: link.index for link in links.values()}
    names = {index: name for name, index in indexes.items()}
    devices = tuple(owned)
    changes = [
        _message(k.route, indexes, add=False, metric=k.metric)
        for version in (4, 6)
        for k in _kernel_routes(ipr, version, names, -1, devices)
        if k.owned or k.route.protocol in protocols
    ]
    netlink.send_batch(ipr, changes)
    return len(changes)
