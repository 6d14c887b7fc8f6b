"""Netlink events that make Felix look at the dataplane again at once, not at the next
refresh: links (a device deleted, set down, its MTU changed), main-table routes, and
neighbour and FDB entries on Felix's own devices (the underlay's ARP churn is not news).

Events caused by Felix's own requests carry its socket's port id and are ignored, so
programming the dataplane does not trigger another pass. A burst of events (a device
deleted takes its routes and entries with it) becomes one kick after a short quiet time.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable

from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)

from calico_node.felix.netlink import RT_TABLE_MAIN, IPRoute

log = logging.getLogger("felix")

QUIET_S = 0.1  # wait this long after an event for more before kicking
POLL_S = 0.5  # how often the thread checks that it should stop
_ROUTE_EVENTS = ("RTM_NEWROUTE", "RTM_DELROUTE")
_NEIGH_EVENTS = ("RTM_NEWNEIGH", "RTM_DELNEIGH")


class NetlinkMonitor:
    def __init__(
        self,
        kick: Callable[[], None],
        own_port: Callable[[], int | None],
        devices: Callable[[], set[int]],
    ) -> None:
        self.kick = kick
        self.own_port = own_port  # the dataplane socket's netlink port id, once it has one
        self.devices = devices  # the link indexes of Felix's devices
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events = 0  # relevant events seen (tests, logs)

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="felix-netlink", daemon=True
        )
        self._thread.start()
        ready.wait(5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _relevant(self, msg: dict) -> bool:
        if msg["header"]["pid"] and msg["header"]["pid"] == self.own_port():
            return False
        if msg["event"] in _ROUTE_EVENTS:
            return (msg.get_attr("RTA_TABLE") or msg["table"]) == RT_TABLE_MAIN
        if msg["event"] in _NEIGH_EVENTS:
            return msg["ifindex"] in self.devices()
        return True

    def _run(self, ready: threading.Event) -> None:
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
            ready.set()
            pending = False
            while not self._stop.is_set():
                readable, _, _ = select.select(
                    [ipr.fileno()], [], [], QUIET_S if pending else POLL_S
                )
                if not readable:
                    if pending:
                        pending = False
                        self.kick()
                    continue
                for msg in ipr.get():
                    if self._relevant(msg):
                        self.events += 1
                        pending = True
