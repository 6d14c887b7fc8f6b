"""Netlink events that make Felix look at the dataplane again at once, not at the next
refresh: links, addresses, main-table routes, neighbour and FDB entries that concern what
Felix programs (its own devices and their addresses, its routes or their destinations, the
interfaces the host MTU comes from). The rest of the host's churn (pods' veths and routes,
the underlay's ARP) is not news.

Events caused by Felix's own requests carry its socket's port id and are ignored, so
programming the dataplane does not trigger another pass. A burst of events (a device
deleted takes its routes and entries with it) becomes one call after a short quiet time.
A plain netlink socket is read here, and pyroute2 only decodes: its IPRoute keeps read
messages queued past `select`, so an event could wait for the next one to be seen. When
the kernel drops events (ENOBUFS), a pass is asked for all the same.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("felix")

RECEIVE_BUFFER = 4 << 20  # bytes: room for the burst of a device and its thousand routes
SO_RCVBUFFORCE = 33
QUIET_S = 0.1  # wait this long after an event for more before calling
POLL_S = 0.5  # how often the thread checks that it should stop
GROUPS = (
    RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)  # fmt: skip


class NetlinkMonitor:
    def __init__(
        self,
        changed: Callable[[], None],
        own_port: Callable[[], int | None],
        relevant: Callable[[Any], bool],
    ) -> None:
        self.changed = changed
        self.own_port = own_port  # the dataplane socket's netlink port id, once it has one
        self.relevant = relevant
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def _news(self, msg: Any) -> bool:
        pid = msg["header"]["pid"]
        if pid and pid == self.own_port():
            return False
        try:
            return self.relevant(msg)
        except Exception:  # a message we cannot read: look, rather than miss a change
            log.debug("netlink event not understood: %r", msg, exc_info=True)
            return True

    def _run(self, ready: threading.Event) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            sock.bind((0, GROUPS))
            ready.set()
            marshal = MarshalRtnl()
            pending = False
            while not self._stop.is_set():
                readable, _, _ = select.select([sock], [], [], QUIET_S if pending else POLL_S)
                if not readable:
                    if pending:
                        pending = False
                        self.changed()
                    continue
                try:
                    data = sock.recv(1 << 20)
                except OSError as err:
                    if err.errno != errno.ENOBUFS:
                        raise
                    log.warning("netlink events were dropped (%s); checking the dataplane", err)
                    pending = True
                    continue
                pending = any(self._news(msg) for msg in marshal.parse(data)) or pending
        finally:
            sock.close()
