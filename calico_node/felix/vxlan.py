"""The VXLAN devices (`vxlan.calico`, `vxlan-v6.calico`) and their peers, as Felix keeps
them (calico-node.md §2.2-2.3).

A device that differs from what it should be in anything that cannot change in place
(VNI, parent, local address, port, learning, MAC) is deleted and created again; MTU, the
single tunnel address and the up state are fixed in place. Each remote VTEP needs a
permanent neighbour entry (tunnel IP -> MAC) and a permanent FDB entry (MAC -> node IP):
with learning off there is no other way to resolve the next hop. Both tables are fully
reconciled, so entries of deleted nodes or changed MACs do not linger (calico #7281).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from pyroute2.netlink.rtnl.ndmsg import ndmsg

from calico_node.felix import netlink
from calico_node.felix.model import VXLAN_DEVICE, VXLANDevice
from calico_node.felix.netlink import IPRoute, Link, NetlinkError

log = logging.getLogger("felix")

RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29


class VXLANError(Exception):
    """A device or entry could not be programmed; the message says which and why."""


def _mismatch(link: Link, want: VXLANDevice, parent: Link) -> str:
    """Why `link` cannot be kept as `want`'s device ("" when it can)."""
    info = link.info
    local = info.get("IFLA_VXLAN_LOCAL" if want.version == 4 else "IFLA_VXLAN_LOCAL6")
    checks = (
        ("type", link.kind, "vxlan"),
        ("VNI", info.get("IFLA_VXLAN_ID"), want.vni),
        ("parent", info.get("IFLA_VXLAN_LINK"), parent.index),
        ("local address", local and ipaddress.ip_address(local), want.local_ip),
        ("port", info.get("IFLA_VXLAN_PORT"), want.port),
        ("learning", info.get("IFLA_VXLAN_LEARNING"), 0),
        ("MAC", link.mac, want.mac),
    )
    return ", ".join(f"{name} {have} (want {need})" for name, have, need in checks if have != need)


class VXLANManager:
    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    def apply(
        self,
        devices: Mapping[int, VXLANDevice],
        links: dict[str, Link],
        parents: Mapping[int, Link],
    ) -> list[str]:
        """Converge both families' devices; `parents` are the interfaces holding this node's
        address, per family. Returns what was fixed (for the log)."""
        fixed: list[str] = []
        for version, name in VXLAN_DEVICE.items():
            want = devices.get(version)
            link = links.get(name)
            if want is None:
                if link is not None:
                    self.ipr.link("del", index=link.index)
                    fixed.append(f"removed {name} (no pool of its family uses VXLAN)")
                continue
            link = self._device(want, link, parents.get(version), fixed)
            self._peers(want, link, fixed)
        return fixed

    def _device(
        self, want: VXLANDevice, link: Link | None, parent: Link | None, fixed: list[str]
    ) -> Link:
        if parent is None:
            raise VXLANError(f"{want.name}: no interface holds this node's address {want.local_ip}")
        if link is not None and (why := _mismatch(link, want, parent)):
            self.ipr.link("del", index=link.index)
            fixed.append(f"recreating {want.name}: it has {why}")
            link = None
        if link is None:
            local = "vxlan_local" if want.version == 4 else "vxlan_local6"
            try:
                self.ipr.link(
                    "add",
                    ifname=want.name,
                    kind="vxlan",
                    vxlan_id=want.vni,
                    vxlan_link=parent.index,
                    vxlan_port=want.port,
                    vxlan_learning=0,
                    address=want.mac,
                    mtu=want.mtu,
                    **{local: str(want.local_ip)},
                )
            except NetlinkError as err:
                raise VXLANError(f"cannot create {want.name}: {netlink.describe(err)}") from err
            fixed.append(f"created {want.name} (VNI {want.vni}, parent {parent.name})")
            link = netlink.Link.parse(self.ipr.get_links(ifname=want.name)[0])
        if link.mtu != want.mtu or not link.up:
            self.ipr.link("set", index=link.index, mtu=want.mtu, state="up")
            if link.mtu != want.mtu:
                fixed.append(f"{want.name}: MTU {link.mtu} -> {want.mtu}")
            if not link.up:
                fixed.append(f"{want.name}: set up")
        self._address(want, link, fixed)
        return link

    def _address(self, want: VXLANDevice, link: Link, fixed: list[str]) -> None:
        """The tunnel address as a host route (/32, /128) and no other global address."""
        wanted = [(want.tunnel_ip, want.tunnel_ip.max_prefixlen)]
        fixed.extend(
            netlink.converge_addresses(self.ipr, link.index, want.name, want.version, wanted)
        )

    def _peers(self, want: VXLANDevice, link: Link, fixed: list[str]) -> None:
        family = netlink.FAMILY[want.version]
        neighbours = {str(v.tunnel_ip): v.mac for v in want.vteps}
        fdb = {v.mac: str(v.parent_ip) for v in want.vteps}
        # The kernel's own (non-permanent) entries for other addresses are not ours.
        have_neigh = {
            dst: (m.get_attr("NDA_LLADDR") or "").lower()
            for m in self.ipr.get_neighbours(family=family, ifindex=link.index)
            if (dst := m.get_attr("NDA_DST"))
            and (m["state"] & netlink.NUD_PERMANENT or dst in neighbours)
        }
        have_fdb: dict[str, set[str]] = {}
        for m in self.ipr.fdb("dump", ifindex=link.index):
            if m["ifindex"] == link.index:
                have_fdb.setdefault(m.get_attr("NDA_LLADDR").lower(), set()).add(
                    m.get_attr("NDA_DST") or ""
                )
        changes = []
        for ip, mac in have_neigh.items():
            if neighbours.get(ip) != mac:
                changes.append(self._neigh(family, link.index, ip, mac, add=False))
                if ip not in neighbours:
                    fixed.append(f"{want.name}: removed neighbour {ip} ({mac})")
        for ip, mac in neighbours.items():
            if have_neigh.get(ip) != mac:
                changes.append(self._neigh(family, link.index, ip, mac, add=True))
                fixed.append(f"{want.name}: neighbour {ip} lladdr {mac}")
        for mac, dsts in have_fdb.items():
            for dst in dsts:
                if fdb.get(mac) != dst:
                    changes.append(self._fdb(link.index, mac, dst, add=False))
                    fixed.append(f"{want.name}: removed FDB {mac} dst {dst or '-'}")
        for mac, dst in fdb.items():
            if have_fdb.get(mac) != {dst}:
                changes.append(self._fdb(link.index, mac, dst, add=True))
                fixed.append(f"{want.name}: FDB {mac} dst {dst}")
        if changes and netlink.send_batch(self.ipr, changes) < len(changes):
            self._check_peers(want, link, neighbours, fdb)

    def _check_peers(
        self, want: VXLANDevice, link: Link, neighbours: dict[str, str], fdb: dict[str, str]
    ) -> None:
        """Some requests failed: say which entries are still missing."""
        family = netlink.FAMILY[want.version]
        have = {
            m.get_attr("NDA_DST"): (m.get_attr("NDA_LLADDR") or "").lower()
            for m in self.ipr.get_neighbours(family=family, ifindex=link.index)
        }
        missing = [f"neighbour {ip}" for ip, mac in neighbours.items() if have.get(ip) != mac]
        have_fdb = {
            (m.get_attr("NDA_LLADDR").lower(), m.get_attr("NDA_DST"))
            for m in self.ipr.fdb("dump", ifindex=link.index)
            if m["ifindex"] == link.index
        }
        missing += [f"FDB {mac}" for mac, dst in fdb.items() if (mac, dst) not in have_fdb]
        if missing:
            raise VXLANError(f"{want.name}: could not program {', '.join(missing)}")

    @staticmethod
    def _neigh(family: int, index: int, ip: str, mac: str, add: bool) -> ndmsg:
        msg = ndmsg()
        msg["family"] = family
        msg["ifindex"] = index
        msg["state"] = netlink.NUD_PERMANENT
        msg["attrs"] = [("NDA_DST", ip), ("NDA_LLADDR", mac)]
        return netlink.request(msg, RTM_NEWNEIGH if add else RTM_DELNEIGH, replace=add)

    @staticmethod
    def _fdb(index: int, mac: str, dst: str, add: bool) -> ndmsg:
        msg = ndmsg()
        msg["family"] = netlink.AF_BRIDGE
        msg["ifindex"] = index
        msg["state"] = netlink.NUD_PERMANENT | netlink.NUD_NOARP
        msg["flags"] = netlink.NTF_SELF
        msg["attrs"] = [("NDA_LLADDR", mac)] + ([("NDA_DST", dst)] if dst else [])
        return netlink.request(msg, RTM_NEWNEIGH if add else RTM_DELNEIGH, replace=add)


def remove_devices(ipr: IPRoute, links: dict[str, Link]) -> list[str]:
    """Uninstall: both VXLAN devices (their routes, FDB and neighbours go with them)."""
    removed = []
    for name in VXLAN_DEVICE.values():
        if name in links:
            ipr.link("del", index=links[name].index)
            removed.append(name)
    return removed
