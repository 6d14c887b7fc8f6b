"""tunl0, IPIP's device (calico-node.md §2.6), where the kernel has it.

The machines this project is tested on have no ipip support (`CONFIG_NET_IPIP` unset, no
modules: feasibility.md §0), so asking for an ipip link gets "Unknown device type". A node
asked for IPIP then says so: the refusal is the manager's result, which the daemon logs,
reports as not ready and shows in `calicoctl node status`; no route through a tunnel that
does not exist is programmed. With ipip in the kernel, tunl0 exists once the module is in
(or is created by asking for it) and is given the node's IPIP tunnel address as /32, the
IPIP MTU, and set up.
"""

from __future__ import annotations

import errno
import logging

from calico_node.felix import netlink
from calico_node.felix.model import IPIP_DEVICE, IPIPDevice
from calico_node.felix.netlink import IPRoute, Link, NetlinkError

log = logging.getLogger("felix")

REFUSAL = (
    "IPIP is not supported by this kernel: it has no ipip tunnel device (tunl0), so "
    "IPIP pool{s} {pools} cannot carry traffic to or from this node; use vxlanMode "
    "(Always or CrossSubnet) instead of ipipMode"
)


def refusal(pools: tuple[str, ...]) -> str:
    names = ", ".join(pools) if pools else "(ipipEnabled)"
    return REFUSAL.format(s="s" if len(pools) > 1 else "", pools=names)


class IPIPManager:
    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    def supported(self, links: dict[str, Link]) -> bool:
        """Whether tunl0 exists or can be made (which loads the module where there is one)."""
        if IPIP_DEVICE in links:
            return True
        try:
            self.ipr.link("add", ifname=IPIP_DEVICE, kind="ipip")
        except NetlinkError as err:
            if err.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                return False
            if err.code != errno.EEXIST:
                raise
        links.update(netlink.links(self.ipr))
        return IPIP_DEVICE in links

    def apply(self, want: IPIPDevice | None, links: dict[str, Link]) -> list[str]:
        """Converge tunl0 (the caller has checked `supported`); returns what was fixed."""
        link = links.get(IPIP_DEVICE)
        if link is None:
            return []
        wanted = [(want.tunnel_ip, 32)] if want is not None and want.tunnel_ip else []
        fixed = netlink.converge_addresses(
            self.ipr, link.index, IPIP_DEVICE, 4, wanted, keep_link_local=False
        )
        if want is not None and (link.mtu != want.mtu or not link.up):
            self.ipr.link("set", index=link.index, mtu=want.mtu, state="up")
            fixed.append(f"{IPIP_DEVICE}: MTU {want.mtu}, up")
        return fixed
