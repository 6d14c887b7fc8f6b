"""Felix as one consumer of the syncer: each pass reads the host, computes the desired
dataplane (model.py) and has each manager converge its part, in dependency order:

    host facts (links, MTU, the node's interface, IPIP support) -> VXLAN devices and peers
    -> tunl0 -> routes -> natOutgoing -> the mtu file

A pass runs on every new snapshot, on netlink events (monitor.py), and every refresh
interval (the smaller of routeRefreshInterval and iptablesRefreshInterval); so whatever was
removed or changed by hand is put back, and the fix is logged. A manager that fails does
not stop the others; the pass then raises and is retried. A node that cannot do what it is
asked (IPIP on this kernel) or is still waiting (for its tunnel address) raises NotReady:
the readiness probe and `calicoctl node status` show the reason.

Stopping the daemon leaves the dataplane in place (pods keep their routes across a
restart); `uninstall` removes all of it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calico_node.felix import ipip, mtu, nat, netlink, routes, vxlan
from calico_node.felix.config import DEFAULT_MTU_IFACE_PATTERN, FelixConfig
from calico_node.felix.model import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    Dataplane,
    HostFacts,
    desired_dataplane,
    ipip_wanted,
)
from calico_node.felix.monitor import NetlinkMonitor
from calico_node.felix.netlink import IPRoute, Link
from calico_node.syncer import Consumer, NotReady, Snapshot
from libcalico.model import IPNetwork

if TYPE_CHECKING:
    from calico_node.context import NodeContext

log = logging.getLogger("felix")


def _own_addresses(snapshot: Snapshot, nodename: str) -> dict[int, str]:
    node = snapshot.nodes.get(nodename)
    bgp = (node.spec.get("bgp") or {}) if node is not None else {}
    found = {}
    for version, key in ((4, "ipv4Address"), (6, "ipv6Address")):
        if bgp.get(key):
            found[version] = str(bgp[key]).split("/")[0]
    return found


class _Watched:
    """Which netlink events concern the dataplane Felix last computed (monitor.py)."""

    def __init__(self) -> None:
        self.devices: set[int] = set()  # link indexes of Felix's devices
        self.felix_proto = 80
        self.destinations: set[IPNetwork] = set()
        self.parents: set[str] = set()
        self.mtu_pattern = re.compile(DEFAULT_MTU_IFACE_PATTERN)

    def update(self, want: Dataplane, config: FelixConfig, host: HostFacts) -> None:
        self.felix_proto = config.felix_route_protocol
        self.destinations = {dst for routes in want.routes.values() for dst in routes}
        self.parents = set(host.parents.values())
        self.mtu_pattern = re.compile(config.mtu_iface_pattern)

    def relevant(self, msg: Any) -> bool:
        event = msg["event"]
        if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
            if (msg.get_attr("RTA_TABLE") or msg["table"]) != netlink.RT_TABLE_MAIN:
                return False
            if msg["proto"] == self.felix_proto or msg.get_attr("RTA_OIF") in self.devices:
                return True
            dst = msg.get_attr("RTA_DST")
            return dst is not None and ipaddress.ip_network(f"{dst}/{msg['dst_len']}") in (
                self.destinations
            )
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            name = msg.get_attr("IFLA_IFNAME") or ""
            return (
                msg["index"] in self.devices
                or name in self.parents
                or name in (*VXLAN_DEVICE.values(), IPIP_DEVICE)
                or bool(self.mtu_pattern.search(name))
            )
        if event in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):  # neighbour and FDB entries
            return msg["ifindex"] in self.devices
        return msg["index"] in self.devices  # addresses


class Felix(Consumer):
    name = "felix"

    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self.env = node.config.environ
        self.backend = node.config.networking_backend
        self.mtu_file = node.paths.lib_dir / "mtu"
        self._ipr: IPRoute | None = None
        self._route_manager: routes.RouteManager | None = None  # keeps what it programmed
        self._port: int | None = None
        self._warned: set[str] = set()
        self._monitor: NetlinkMonitor | None = None
        # Read the kernel back (resync) when it changed behind our back or the refresh is due;
        # otherwise a pass only writes what the data changed.
        self._dirty = threading.Event()
        self._dirty.set()
        self._resynced_at = 0.0
        self._nat_checked_at = 0.0
        self._applied: dict[str, object] = {}  # what each manager last converged to
        self._watch = _Watched()
        self._last_problems: tuple[str, ...] = ()
        self.dataplane: Dataplane | None = None  # the last desired state (status, tests)

    # -- plumbing

    def _watch_netlink(self) -> None:
        """Be applied again soon after relevant netlink events (from the first pass on: its
        thread is in this node's netns, and the monitor's thread is made there too)."""

        def changed() -> None:
            self._dirty.set()
            self.request_apply()

        self._monitor = NetlinkMonitor(changed, lambda: self._port, self._watch.relevant)
        self._monitor.start()

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _socket(self) -> IPRoute:
        """Opened in the consumer's thread, at its first pass."""
        if self._ipr is None:
            self._ipr = IPRoute()
            self._route_manager = routes.RouteManager(self._ipr)
        return self._ipr

    def _links(self) -> dict[str, Link]:
        messages = self._socket().get_links()
        if messages:
            self._port = messages[0]["header"]["pid"]  # our port id: our own events' mark
        found = {link.name: link for link in map(Link.parse, messages)}
        self._watch.devices = {
            found[n].index for n in (*VXLAN_DEVICE.values(), IPIP_DEVICE) if n in found
        }
        return found

    # -- one pass

    def apply(self, snapshot: Snapshot) -> None:
        me = self.node.name
        config = FelixConfig.resolve(
            self.env,
            snapshot.felix_configuration("default"),
            snapshot.felix_configuration(f"node.{me}"),
            self._warned,
        )
        self.refresh_interval = config.refresh_interval
        now = time.monotonic()
        resync = self._dirty.is_set() or now - self._resynced_at >= config.route_refresh_interval
        if resync:
            self._dirty.clear()
            self._resynced_at = now
        ipr = self._socket()
        if self._monitor is None:
            self._watch_netlink()
        route_manager = self._route_manager
        assert route_manager is not None
        links = self._links()
        problems: list[str] = []
        fixed: list[str] = []
        supported = True
        if ipip_wanted(snapshot, config):
            supported = ipip.IPIPManager(ipr).supported(links)
        parents = self._parents(ipr, links, snapshot)
        host = HostFacts(
            host_mtu=mtu.detect(links, config.mtu_iface_pattern, self._warned),
            parents={version: link.name for version, link in parents.items()},
            ipip_supported=supported,
        )
        want = desired_dataplane(snapshot, me, config, self.backend, host)
        self.dataplane = want
        self._watch.update(want, config, host)
        if not supported:
            assert want.ipip is not None  # IPIP is wanted: that is what was not supported
            problems.append(ipip.refusal(want.ipip.pools))
        problems += want.waiting

        def step(what: str, inputs: object, force: bool, run: Callable[[], list[str]]) -> None:
            """Run a manager unless its inputs are what it last converged to (and the
            kernel is not to be read back); remember them when it succeeds."""
            if not force and self._applied.get(what) == inputs:
                return
            try:
                fixed.extend(run())
            except Exception as err:
                log.debug("%s failed", what, exc_info=True)
                problems.append(f"{what}: {err}")
                self._applied.pop(what, None)
                return
            self._applied[what] = inputs

        step(
            "VXLAN",
            want.vxlan,
            resync,
            lambda: vxlan.VXLANManager(ipr).apply(want.vxlan, links, parents),
        )
        links = self._links()
        if supported:
            step("IPIP", want.ipip, resync, lambda: ipip.IPIPManager(ipr).apply(want.ipip, links))
        step(
            "routes",
            None,
            True,
            lambda: route_manager.apply(
                want.routes, links, config.felix_route_protocol, want.owned_devices, resync
            ),
        )
        nat_due = now - self._nat_checked_at >= config.iptables_refresh_interval
        if nat_due:
            self._nat_checked_at = now
        step("natOutgoing", (want.nat, config), nat_due,
             lambda: nat.MasqManager().apply(want.nat, config))  # fmt: skip
        step("MTU file", None, True, lambda: self._mtu_file(want.mtu))
        for line in fixed:
            log.info("dataplane: %s", line)
        self._report(tuple(problems))
        if problems:
            self._dirty.set()  # the retry reads everything back
            raise NotReady("; ".join(problems))

    def _parents(self, ipr: IPRoute, links: dict[str, Link], snapshot: Snapshot) -> dict[int, Link]:
        """The interface holding the node's address, per family."""
        parents = {}
        for version, text in _own_addresses(snapshot, self.node.name).items():
            link = netlink.interface_with(ipr, links, ipaddress.ip_address(text))
            if link is not None:
                parents[version] = link
        return parents

    def _mtu_file(self, value: int) -> list[str]:
        if mtu.write_file(self.mtu_file, value):
            return [f"wrote {self.mtu_file}: {value}"]
        return []

    def _report(self, problems: tuple[str, ...]) -> None:
        """Log a change of what keeps this node from being ready, once."""
        if problems != self._last_problems:
            for problem in problems:
                if problem not in self._last_problems:
                    log.error("dataplane not ready: %s", problem)
            if not problems:
                log.info("dataplane in sync")
        self._last_problems = problems


def uninstall(lib_dir: Path, env: Mapping[str, str]) -> list[str]:
    """Remove what Felix put on this host: its routes (and BIRD's, which `persist` leaves),
    devices, nat chains, ipsets and the mtu file."""
    config = FelixConfig.resolve(env, {}, {})
    removed: list[str] = []
    with IPRoute() as ipr:
        links = netlink.links(ipr)
        owned = (*VXLAN_DEVICE.values(), IPIP_DEVICE)
        protocols = {config.felix_route_protocol, routes.RTPROT_BIRD}
        count = routes.remove_owned(ipr, links, protocols, owned)
        if count:
            removed.append(f"{count} routes")
        removed += vxlan.remove_devices(ipr, links)
        removed += ipip.IPIPManager(ipr).apply(None, links)
    removed += nat.remove_all()
    if mtu.remove_file(lib_dir / "mtu"):
        removed.append(str(lib_dir / "mtu"))
    return removed
