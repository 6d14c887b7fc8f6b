"""A small rtnetlink client on stdlib `socket` + `struct`: links, addresses and routes.

Why not pyroute2, the well-kept library: measured on these machines (cost-floor.md §1, §4;
agent-prototype.md §1-2, §4), importing pyroute2 costs ~250-300 ms per process, and inside
the node agent it spent ~10 ms of Python CPU per ADD (asyncio loops, attribute encoders;
`dataplane.setup_pod` took 24 ms, agent ADD p50 ~32 ms). The same ADD over raw rtnetlink,
with the pod-side requests batched in one send(), took 2.2 ms. This module imports only
the stdlib modules below: ~2 ms once `ipaddress` (which cni_plugin.types needs anyway)
is loaded.

A socket belongs to the netns of the thread that opened it (`with netns.entered(fd):
sock = RtnlSocket()`), and stays there after the thread switches back. Every change is
sent with NLM_F_ACK; a Batch sends several changes in one send() and collects their ACKs
(the kernel handles them in order, so a later request may depend on an earlier one).
"""

from __future__ import annotations

import _socket  # not `socket`: its enum set-up and `selectors` import cost ~4.5 ms here
import errno
import ipaddress
import os
import struct

AF_UNSPEC, AF_INET, AF_INET6 = 0, _socket.AF_INET, _socket.AF_INET6
NETLINK_ROUTE = 0
IFNAMSIZ = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ACK attributes follow
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_NUM_TX_QUEUES = 31
IFLA_NUM_RX_QUEUES = 32
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFF_UP = 0x1
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
SCOPE_UNIVERSE = 0
SCOPE_LINK = 253
PROTO_BOOT = 3

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_RTATTR = struct.Struct("=HH")  # length, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_RECV_BYTES = 1 << 16  # the kernel sizes dump messages to at most 32 KiB

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetlinkError(OSError):
    """The kernel refused a request; `.code` (= `.errno`) is the errno it returned."""

    def __init__(self, code: int, what: str, detail: str = "") -> None:
        super().__init__(code, os.strerror(code))
        self.code = code
        self.what = what
        self.detail = detail

    def __str__(self) -> str:
        text = f"[Errno {self.code}] {self.strerror} ({self.what})"
        return f"{text}: {self.detail}" if self.detail else text


class _Record:
    """A value object with named fields (dataclasses would cost ~10 ms of import here)."""

    __slots__ = ()

    def __init__(self, **fields: object) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.pop(name))
        if fields:
            raise TypeError(f"unexpected fields {sorted(fields)}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Record)
            and type(other) is type(self)
            and (self._values() == other._values())
        )

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Link(_Record):
    __slots__ = ("flags", "index", "kind", "mac", "name", "operstate")
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND, e.g. "veth"; "" for links without one (lo)
    mac: str  # lower-case "aa:bb:..."; "" when the link has none
    operstate: str  # "UP", "DOWN", "LOWERLAYERDOWN", ...
    flags: int  # IFF_*

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


class Address(_Record):
    __slots__ = ("address", "flags", "index", "prefixlen", "scope")
    index: int
    address: IPAddress
    prefixlen: int
    flags: int
    scope: int


class Route(_Record):
    __slots__ = ("dst", "gateway", "oif", "protocol", "scope", "table")
    dst: IPNetwork  # 0.0.0.0/0 or ::/0 for a default route
    gateway: IPAddress | None
    oif: int  # 0 when the route has no single output interface
    table: int
    scope: int
    protocol: int


class _Request(_Record):
    """One netlink request: its type, flags, body (fixed header + attributes), and what it does."""

    __slots__ = ("body", "flags", "type", "what")
    type: int
    flags: int
    body: bytes
    what: str

    def encode(self, seq: int) -> bytes:
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(self.body), self.type, self.flags, seq, 0)
        return header + self.body


def _attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes; nest by passing packed attributes as the payload."""
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _u32(value: int) -> bytes:
    return _U32.pack(value)


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def _mac(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", ""))


def _parse_attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, bytes]:
    """rtattrs from `offset` on, by type (nesting flags masked off); nest by parsing a value."""
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        attrs[kind & 0x3FFF] = bytes(data[offset + _RTATTR.size : offset + length])
        offset += (length + 3) & ~3
    return attrs


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode()


def _parse_link(body: bytes) -> Link:
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(body)
    attrs = _parse_attrs(body, _IFINFOMSG.size)
    info = _parse_attrs(attrs.get(IFLA_LINKINFO, b""))
    operstate = attrs.get(IFLA_OPERSTATE, b"\0")[0]
    return Link(
        index=index,
        name=_text(attrs.get(IFLA_IFNAME, b"")),
        kind=_text(info.get(IFLA_INFO_KIND, b"")),
        mac=":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b"")),
        operstate=OPERSTATES[operstate] if operstate < len(OPERSTATES) else str(operstate),
        flags=flags,
    )


def _parse_address(body: bytes) -> Address:
    _, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(body)
    attrs = _parse_attrs(body, _IFADDRMSG.size)
    if IFA_FLAGS in attrs:
        flags = _U32.unpack(attrs[IFA_FLAGS])[0]
    # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer's on point-to-point links.
    raw = attrs.get(IFA_LOCAL) or attrs[IFA_ADDRESS]
    return Address(
        index=index,
        address=ipaddress.ip_address(raw),
        prefixlen=prefixlen,
        flags=flags,
        scope=scope,
    )


def _parse_route(body: bytes) -> Route:
    family, dst_len, _, _, table, protocol, scope, _, _ = _RTMSG.unpack_from(body)
    attrs = _parse_attrs(body, _RTMSG.size)
    any_address = b"\0" * (4 if family == AF_INET else 16)
    gateway = attrs.get(RTA_GATEWAY)
    return Route(
        dst=ipaddress.ip_network((attrs.get(RTA_DST, any_address), dst_len), strict=False),
        gateway=ipaddress.ip_address(gateway) if gateway else None,
        oif=_U32.unpack(attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0,
        table=_U32.unpack(attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else table,
        scope=scope,
        protocol=protocol,
    )


def family(version: int) -> int:
    """AF_INET for IP version 4, AF_INET6 for 6."""
    return AF_INET if version == 4 else AF_INET6


def _link_attrs(name: str, mac: str, mtu: int, num_queues: int) -> bytes:
    """The attributes both ends of a new veth share."""
    attrs = _attr(IFLA_IFNAME, _name(name))
    if mac:
        attrs += _attr(IFLA_ADDRESS, _mac(mac))
    if mtu:
        attrs += _attr(IFLA_MTU, _u32(mtu))
    if num_queues:
        attrs += _attr(IFLA_NUM_TX_QUEUES, _u32(num_queues))
        attrs += _attr(IFLA_NUM_RX_QUEUES, _u32(num_queues))
    return attrs


def _link_selector(name: str, index: int) -> bytes:
    """ifinfomsg + IFLA_IFNAME that pick one link by index or, when index is 0, by name."""
    body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0)
    return body + _attr(IFLA_IFNAME, _name(name)) if name and not index else body


class _Changes:
    """The change requests; RtnlSocket sends each at once, Batch queues them for one send()."""

    def _submit(self, request: _Request) -> None:
        raise NotImplementedError

    def _change(self, kind: int, flags: int, body: bytes, what: str) -> None:
        self._submit(
            _Request(type=kind, flags=NLM_F_REQUEST | NLM_F_ACK | flags, body=body, what=what)
        )

    def create_veth(
        self,
        name: str,
        peer_name: str,
        *,
        peer_netns_fd: int | None = None,
        mac: str = "",
        peer_mac: str = "",
        mtu: int = 0,
        num_queues: int = 0,
    ) -> None:
        """A veth pair, down; the peer is created directly in `peer_netns_fd` when given."""
        peer = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0)
        peer += _link_attrs(peer_name, peer_mac, mtu, num_queues)
        if peer_netns_fd is not None:
            peer += _attr(IFLA_NET_NS_FD, _u32(peer_netns_fd))
        info = _attr(IFLA_INFO_KIND, _name("veth"))
        info += _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0)
        body += _link_attrs(name, mac, mtu, num_queues) + _attr(IFLA_LINKINFO, info)
        what = f"creating veth {name} with peer {peer_name}"
        self._change(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, what)

    def set_link(self, index: int, *, up: bool | None = None, mac: str = "") -> None:
        """Bring link `index` up or down and/or set its MAC."""
        flags, change = (IFF_UP if up else 0, IFF_UP) if up is not None else (0, 0)
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, flags, change)
        if mac:
            body += _attr(IFLA_ADDRESS, _mac(mac))
        changes = [] if up is None else ["up" if up else "down"]
        changes += [f"address {mac}"] if mac else []
        self._change(RTM_SETLINK, 0, body, f"setting link {index} {' '.join(changes)}")

    def delete_link(self, name: str = "", index: int = 0) -> None:
        """Delete a link by index or name (for a veth, the kernel removes both ends)."""
        self._change(RTM_DELLINK, 0, _link_selector(name, index), f"deleting link {name or index}")

    def add_address(
        self, index: int, address: IPAddress | str, prefixlen: int, *, flags: int = 0
    ) -> None:
        """Add `address/prefixlen` on link `index`; flags are IFA_F_* (e.g. IFA_F_NODAD)."""
        ip = ipaddress.ip_address(address)
        body = _IFADDRMSG.pack(family(ip.version), prefixlen, flags & 0xFF, SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, ip.packed) + _attr(IFA_ADDRESS, ip.packed)
        body += _attr(IFA_FLAGS, _u32(flags))
        what = f"adding address {ip}/{prefixlen} on link {index}"
        self._change(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, what)

    def add_route(
        self,
        dst: IPNetwork | str,
        *,
        oif: int,
        gateway: IPAddress | str | None = None,
        scope: int = SCOPE_UNIVERSE,
        protocol: int = PROTO_BOOT,
    ) -> None:
        """Add a route in the main table to `dst` out of link `oif`, optionally via `gateway`."""
        net = ipaddress.ip_network(dst)
        body = _RTMSG.pack(
            family(net.version), net.prefixlen, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, 0
        )
        if net.prefixlen:
            body += _attr(RTA_DST, net.network_address.packed)
        body += _attr(RTA_OIF, _u32(oif))
        what = f"adding route {net} dev {oif}"
        if gateway is not None:
            via = ipaddress.ip_address(gateway)
            body += _attr(RTA_GATEWAY, via.packed)
            what += f" via {via}"
        self._change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body, what)


class RtnlSocket(_Changes):
    """A NETLINK_ROUTE socket in the netns of the thread that creates it."""

    def __init__(self) -> None:
        sock = _socket.socket(
            _socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            # Short error ACKs (no echoed request) with the kernel's reason text attached.
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._seq = 0

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def batch(self) -> Batch:
        """Changes queued on the returned Batch go out in one send() when it commits."""
        return Batch(self)

    def _submit(self, request: _Request) -> None:
        self._transact([request])

    def _transact(self, requests: list[_Request]) -> list[list[bytes]]:
        """Send `requests` in one send(); wait for all to finish; each one's reply bodies.

        Raises NetlinkError for the first request (in order) the kernel refused.
        """
        first = self._seq + 1
        self._seq += len(requests)
        self._sock.send(b"".join(r.encode(first + i) for i, r in enumerate(requests)))
        replies: list[list[bytes]] = [[] for _ in requests]
        errors: dict[int, tuple[int, str]] = {}
        pending = set(range(len(requests)))
        while pending:
            data = self._sock.recv(_RECV_BYTES)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                body = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                i = seq - first
                if i not in pending:  # left over from an exchange interrupted earlier
                    continue
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    pending.discard(i)
                    code = -_I32.unpack_from(body)[0] if len(body) >= _I32.size else 0
                    if code:
                        errors[i] = (code, _ack_message(body, kind, flags))
                else:
                    replies[i].append(body)
        if errors:
            i = min(errors)
            raise NetlinkError(errors[i][0], requests[i].what, errors[i][1])
        return replies

    def _query(self, kind: int, body: bytes, what: str, dump: bool = False) -> list[bytes]:
        """A get (its reply, then an ACK) or a dump (replies, then NLMSG_DONE)."""
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        return self._transact([_Request(type=kind, flags=flags, body=body, what=what)])[0]

    def link(self, name: str = "", index: int = 0) -> Link | None:
        """The link with this index or name, or None when there is none."""
        if not index and len(name.encode()) >= IFNAMSIZ:
            return None  # no such name can exist; the kernel would reject the request
        try:
            bodies = self._query(
                RTM_GETLINK, _link_selector(name, index), f"getting link {name or index}"
            )
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        return _parse_link(bodies[0])

    def link_index(self, name: str) -> int | None:
        link = self.link(name)
        return link.index if link else None

    def addresses(self, index: int, family: int) -> list[Address]:
        """Every address of `family` (AF_INET or AF_INET6) on link `index`."""
        body = _IFADDRMSG.pack(family, 0, 0, 0, 0)
        found = map(_parse_address, self._query(RTM_GETADDR, body, "dumping addresses", dump=True))
        return [a for a in found if a.index == index]

    def routes(self, family: int, oif: int | None = None) -> list[Route]:
        """Every route of `family` in every table, only those out of `oif` when given."""
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        found = map(_parse_route, self._query(RTM_GETROUTE, body, "dumping routes", dump=True))
        return [r for r in found if oif is None or r.oif == oif]

    def route_get(self, dst: IPAddress | str) -> list[Route]:
        """The route(s) the kernel would use to reach `dst` (`ip route get`)."""
        ip = ipaddress.ip_address(dst)
        body = _RTMSG.pack(family(ip.version), ip.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
        body += _attr(RTA_DST, ip.packed)
        return [_parse_route(b) for b in self._query(RTM_GETROUTE, body, f"getting route to {ip}")]


class Batch(_Changes):
    """Changes sent together in one send() on commit (or on leaving a `with` block cleanly)."""

    def __init__(self, sock: RtnlSocket) -> None:
        self._sock = sock
        self._requests: list[_Request] = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.commit()

    def _submit(self, request: _Request) -> None:
        self._requests.append(request)

    def commit(self) -> None:
        """Send the queued changes; raises NetlinkError for the first one refused."""
        requests, self._requests = self._requests, []
        if requests:
            self._sock._transact(requests)


def _ack_message(body: bytes, kind: int, flags: int) -> str:
    """The kernel's extended-ACK text (NLMSGERR_ATTR_MSG), if it sent one."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # NLMSG_ERROR: the code, then the request's header (NETLINK_CAP_ACK drops its payload);
    # NLMSG_DONE: the code alone. The attributes follow.
    header = _NLMSGHDR.size if kind == NLMSG_ERROR else 0
    attrs = _parse_attrs(body, _I32.size + header)
    return _text(attrs.get(NLMSGERR_ATTR_MSG, b""))
