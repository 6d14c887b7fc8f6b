"""cni_plugin.dataplane.rtnl against the real kernel, read back independently with `ip -j`.

Every test works inside throwaway network namespaces created and deleted by exact name.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cni_plugin.dataplane import netns, rtnl
from tests.harness import Netns, ip_json

pytestmark = pytest.mark.root

HOST = "rt-host0"
PEER_MAC = "02:12:34:56:78:9a"
HOST_MAC = "ee:ee:ee:ee:ee:ee"


@dataclass
class Namespace:
    """A throwaway netns and an rtnl socket opened inside it."""

    ns: Netns
    fd: int
    sock: rtnl.RtnlSocket

    def ip(self, *args: str) -> Any:
        return ip_json(self.ns.name, *args)

    def link(self, name: str) -> dict[str, Any]:
        return self.ip("-d", "link", "show", "dev", name)[0]


def _namespace(prefix: str) -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.fail("rtnl tests need root")
    ns = Netns.create(prefix)
    fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.entered(fd):
            sock = rtnl.RtnlSocket()
        with sock:
            yield Namespace(ns, fd, sock)
    finally:
        os.close(fd)
        ns.delete()


@pytest.fixture
def host() -> Iterator[Namespace]:
    yield from _namespace("rtnl-host")


@pytest.fixture
def pod() -> Iterator[Namespace]:
    yield from _namespace("rtnl-pod")


@pytest.fixture
def veth(host: Namespace, pod: Namespace) -> int:
    """A veth HOST in `host` with its peer eth0 in `pod`, both up; returns HOST's index."""
    host.sock.create_veth(HOST, "eth0", peer_netns_fd=pod.fd, mac=HOST_MAC)
    index = host.link(HOST)["ifindex"]
    host.sock.set_link(index, up=True)
    pod.sock.set_link(pod.link("eth0")["ifindex"], up=True)
    return index


def test_veth_peer_is_created_in_the_other_netns_with_its_mac_mtu_and_queues(
    host: Namespace, pod: Namespace
) -> None:
    host.sock.create_veth(
        HOST,
        "eth0",
        peer_netns_fd=pod.fd,
        mac=HOST_MAC,
        peer_mac=PEER_MAC,
        mtu=1400,
        num_queues=3,
    )
    ends = {"host": host.link(HOST), "pod": pod.link("eth0")}
    for end in ends.values():
        assert end["linkinfo"]["info_kind"] == "veth"
        assert end["mtu"] == 1400
        assert end["num_tx_queues"] == end["num_rx_queues"] == 3
        assert "UP" not in end["flags"]
    assert ends["host"]["address"] == HOST_MAC
    assert ends["pod"]["address"] == PEER_MAC
    assert [link["ifname"] for link in host.ip("link", "show")] == ["lo", HOST]
    assert [link["ifname"] for link in pod.ip("link", "show")] == ["lo", "eth0"]


def test_veth_without_options_gets_kernel_defaults(host: Namespace) -> None:
    host.sock.create_veth(HOST, "rt-peer0")
    ends = host.link(HOST), host.link("rt-peer0")
    assert all(end["mtu"] == 1500 for end in ends)
    assert ends[0]["address"] != ends[1]["address"]


def test_creating_an_existing_link_raises_eexist(host: Namespace, veth: int) -> None:
    with pytest.raises(rtnl.NetlinkError) as caught:
        host.sock.create_veth(HOST, "rt-other0")
    assert caught.value.code == caught.value.errno == errno.EEXIST
    assert isinstance(caught.value, OSError)
    assert str(caught.value).startswith("[Errno 17] File exists (creating veth rt-host0")
    assert [link["ifname"] for link in host.ip("link", "show")] == ["lo", HOST]


def test_link_details_match_what_ip_reports(host: Namespace, veth: int) -> None:
    by_name, by_index = host.sock.link(HOST), host.sock.link(index=veth)
    assert by_name == by_index
    assert by_name is not None
    shown = host.link(HOST)
    assert (by_name.index, by_name.name, by_name.kind, by_name.mac) == (
        shown["ifindex"],
        HOST,
        "veth",
        HOST_MAC,
    )
    assert by_name.up and by_name.operstate == shown["operstate"] == "UP"
    lo = host.sock.link("lo")
    assert lo is not None and lo.kind == "" and lo.index == 1
    assert host.sock.link_index(HOST) == veth


def test_absent_links_are_none(host: Namespace) -> None:
    assert host.sock.link("rt-absent0") is None
    assert host.sock.link(index=4242) is None
    assert host.sock.link_index("rt-absent0") is None
    assert host.sock.link("a-name-longer-than-ifnamsiz") is None


def test_set_link_down_and_mac(host: Namespace, veth: int) -> None:
    host.sock.set_link(veth, up=False)
    host.sock.set_link(veth, mac="02:00:00:00:00:07")
    shown = host.link(HOST)
    assert "UP" not in shown["flags"]
    assert shown["address"] == "02:00:00:00:00:07"
    link = host.sock.link(HOST)
    assert link is not None and not link.up and link.operstate == "DOWN"


def test_delete_link_by_name_and_by_index(host: Namespace, pod: Namespace, veth: int) -> None:
    host.sock.create_veth("rt-a0", "rt-b0")
    pod.sock.delete_link("eth0")
    host.sock.delete_link(index=host.link("rt-a0")["ifindex"])
    assert [link["ifname"] for link in host.ip("link", "show")] == ["lo"]
    assert [link["ifname"] for link in pod.ip("link", "show")] == ["lo"]


def test_deleting_an_absent_link_raises_enodev(host: Namespace) -> None:
    with pytest.raises(rtnl.NetlinkError) as caught:
        host.sock.delete_link("rt-absent0")
    assert caught.value.code == errno.ENODEV
    assert "deleting link rt-absent0" in str(caught.value)


def test_addresses_v4_and_v6(host: Namespace, veth: int) -> None:
    host.sock.add_address(veth, "10.91.0.2", 24)
    host.sock.add_address(veth, ipaddress.ip_address("fd00:91::2"), 64, flags=rtnl.IFA_F_NODAD)
    shown = {
        (a["local"], a["prefixlen"]): a
        for a in host.ip("addr", "show", "dev", HOST)[0]["addr_info"]
        if a["scope"] == "global"
    }
    assert set(shown) == {("10.91.0.2", 24), ("fd00:91::2", 64)}
    assert shown["fd00:91::2", 64].get("nodad") is True
    assert "nodad" not in shown["10.91.0.2", 24]
    v4 = host.sock.addresses(veth, rtnl.AF_INET)
    assert [(a.address, a.prefixlen, a.index) for a in v4] == [
        (ipaddress.ip_address("10.91.0.2"), 24, veth)
    ]
    v6 = {(str(a.address), a.prefixlen): a for a in host.sock.addresses(veth, rtnl.AF_INET6)}
    assert v6["fd00:91::2", 64].flags & rtnl.IFA_F_NODAD
    assert host.sock.addresses(1, rtnl.AF_INET)[0].address == ipaddress.ip_address("127.0.0.1")


def test_adding_an_existing_address_raises_eexist(host: Namespace, veth: int) -> None:
    host.sock.add_address(veth, "10.91.0.2", 32)
    with pytest.raises(rtnl.NetlinkError) as caught:
        host.sock.add_address(veth, "10.91.0.2", 32)
    assert caught.value.code == errno.EEXIST
    assert "adding address 10.91.0.2/32" in str(caught.value)


def test_routes_v4(host: Namespace, veth: int) -> None:
    host.sock.add_route("169.254.1.1/32", oif=veth, scope=rtnl.SCOPE_LINK)
    host.sock.add_route("0.0.0.0/0", oif=veth, gateway="169.254.1.1")
    host.sock.add_route(ipaddress.ip_network("10.92.0.0/16"), oif=veth, gateway="169.254.1.1")
    shown = {r["dst"]: r for r in host.ip("-d", "-4", "route", "show")}
    assert set(shown) == {"169.254.1.1", "default", "10.92.0.0/16"}
    assert shown["169.254.1.1"]["scope"] == "link"
    assert shown["169.254.1.1"]["protocol"] == "boot"
    assert shown["default"]["gateway"] == shown["10.92.0.0/16"]["gateway"] == "169.254.1.1"
    assert all(r["dev"] == HOST for r in shown.values())
    main = {
        (str(r.dst), str(r.gateway) if r.gateway else None, r.scope)
        for r in host.sock.routes(rtnl.AF_INET, oif=veth)
        if r.table == 254
    }
    assert main == {
        ("169.254.1.1/32", None, rtnl.SCOPE_LINK),
        ("0.0.0.0/0", "169.254.1.1", 0),
        ("10.92.0.0/16", "169.254.1.1", 0),
    }
    via_lo = host.sock.routes(rtnl.AF_INET, oif=1)
    assert via_lo and {r.oif for r in via_lo} == {1}
    assert ipaddress.ip_network("10.92.0.0/16") not in {r.dst for r in via_lo}
    assert [r.oif for r in host.sock.route_get("10.92.3.4")] == [veth]


def test_routes_v6(host: Namespace, veth: int) -> None:
    host.sock.add_route("fd00:93::/64", oif=veth, gateway="fe80::1")
    host.sock.add_route("::/0", oif=veth, gateway="fe80::1")
    shown = {r["dst"]: r for r in host.ip("-6", "route", "show") if r["dst"] != "fe80::/64"}
    assert set(shown) == {"fd00:93::/64", "default"}
    assert all(r["gateway"] == "fe80::1" and r["dev"] == HOST for r in shown.values())
    dumped = {
        (str(r.dst), str(r.gateway)) for r in host.sock.routes(rtnl.AF_INET6, oif=veth) if r.gateway
    }
    assert dumped == {("fd00:93::/64", "fe80::1"), ("::/0", "fe80::1")}
    assert [r.oif for r in host.sock.route_get(ipaddress.ip_address("fd00:93::5"))] == [veth]


def test_route_errors_carry_the_kernel_reason(host: Namespace, veth: int) -> None:
    with pytest.raises(rtnl.NetlinkError) as caught:
        host.sock.add_route("10.94.0.0/16", oif=veth, gateway="10.99.0.1")
    assert caught.value.code == errno.ENETUNREACH
    assert caught.value.what == f"adding route 10.94.0.0/16 dev {veth} via 10.99.0.1"
    assert caught.value.detail  # the kernel's extended-ACK text: "Nexthop has invalid gateway"
    host.sock.add_route("10.94.0.1/32", oif=veth, scope=rtnl.SCOPE_LINK)
    with pytest.raises(rtnl.NetlinkError) as caught:
        host.sock.add_route("10.94.0.1/32", oif=veth, scope=rtnl.SCOPE_LINK)
    assert caught.value.code == errno.EEXIST
    with pytest.raises(rtnl.NetlinkError) as caught:
        host.sock.route_get("fd00:99::1")
    assert caught.value.code == errno.ENETUNREACH


def test_batch_applies_dependent_changes_in_order(pod: Namespace, veth: int) -> None:
    index = pod.link("eth0")["ifindex"]
    pod.sock.set_link(index, up=False)
    with pod.sock.batch() as batch:
        batch.set_link(index, up=True)
        batch.add_route("169.254.1.1/32", oif=index, scope=rtnl.SCOPE_LINK)
        batch.add_route("0.0.0.0/0", oif=index, gateway="169.254.1.1")  # needs the one above
        batch.add_address(index, "10.95.0.2", 32)
        batch.add_address(index, "fd00:95::2", 128, flags=rtnl.IFA_F_NODAD)
    assert "UP" in pod.link("eth0")["flags"]
    assert {r["dst"] for r in pod.ip("-4", "route", "show")} == {"169.254.1.1", "default"}
    assert sorted(pod.ns.addrs("eth0")) == ["10.95.0.2/32", "fd00:95::2/128"]


def test_batch_raises_the_first_refused_change(pod: Namespace, veth: int) -> None:
    index = pod.link("eth0")["ifindex"]
    batch = pod.sock.batch()
    batch.add_address(index, "10.96.0.2", 32)
    batch.add_route("10.96.1.0/24", oif=index, gateway="10.99.0.1")  # unreachable gateway
    batch.add_address(index, "10.96.0.2", 32)  # EEXIST, but after the first failure
    batch.add_address(index, "10.96.0.3", 32)
    with pytest.raises(rtnl.NetlinkError) as caught:
        batch.commit()
    assert caught.value.code == errno.ENETUNREACH
    assert "adding route 10.96.1.0/24" in str(caught.value)
    # The kernel still handled every message of the send, in order.
    assert sorted(pod.ns.addrs("eth0")) == ["10.96.0.2/32", "10.96.0.3/32"]
    # The socket is still in step: the next request gets its own reply.
    assert pod.sock.link_index("eth0") == index


def test_socket_stays_in_the_netns_it_was_opened_in(host: Namespace, veth: int) -> None:
    """The fixture opened the socket inside the netns and switched back; the host has no HOST."""
    assert not os.path.exists(f"/sys/class/net/{HOST}")
    assert host.sock.link_index(HOST) == veth
