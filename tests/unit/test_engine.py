"""Calico's IPAM rules, one test per rule, against a real SQLite datastore file."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam_plugin.engine import (
    BLOCK_LIMIT_MESSAGE,
    IPAM,
    MAX_RETRIES_MESSAGE,
    AutoAssignRequest,
    IPAMError,
    block_cidrs,
    fnv1_32,
)
from ipam_plugin.inspect import check_consistency
from libcalico.datastore.base import AlreadyExists, Conflict, KVPair, NotFound
from libcalico.datastore.local import LocalDatastore
from libcalico.model import (
    AllocationBlock,
    BlockAffinity,
    BlockAffinityKey,
    BlockKey,
    BlockListOptions,
    HandleKey,
    IPAMConfig,
    IPAMConfigKey,
    IPAMHandle,
    IPPool,
    IPReservation,
    ObjectMeta,
    ResourceKey,
)

NODE = "node1"
ATTRS = {"node": NODE, "pod": "web-0", "namespace": "default"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalDatastore]:
    with LocalDatastore(str(tmp_path / "calico.db")) as datastore:
        yield datastore


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ipam(store: LocalDatastore, clock: Clock) -> IPAM:
    engine = IPAM(store, clock=clock)
    for host in ("node1", "node2"):
        engine.ensure_node(host)
    return engine


def add_pool(store: LocalDatastore, name: str, cidr: str, **spec: Any) -> None:
    doc = {"metadata": {"name": name}, "spec": {"cidr": cidr, **spec}}
    store.create(KVPair(ResourceKey("IPPool", name), IPPool.from_json(doc)))


def set_config(store: LocalDatastore, **fields: Any) -> None:
    try:
        store.update(KVPair(IPAMConfigKey(), IPAMConfig(**fields)))
    except NotFound:
        store.create(KVPair(IPAMConfigKey(), IPAMConfig(**fields)))


def block(store: LocalDatastore, cidr: str) -> AllocationBlock:
    return store.get(BlockKey(ipaddress.ip_network(cidr))).value


def affinity(store: LocalDatastore, host: str, cidr: str) -> BlockAffinity:
    return store.get(BlockAffinityKey(host, ipaddress.ip_network(cidr))).value


def handle(store: LocalDatastore, handle_id: str) -> IPAMHandle | None:
    try:
        return store.get(HandleKey(handle_id)).value
    except NotFound:
        return None


def assign(ipam: IPAM, handle_id: str, host: str = NODE, **kw: Any) -> list[Any]:
    v4, _ = ipam.auto_assign(AutoAssignRequest(handle_id, host, ATTRS, **kw))
    return v4.ips


def assert_consistent(store: LocalDatastore) -> None:
    report = check_consistency(store)
    assert report.ok, report


# ------------------------------------------------------------------ blocks


def test_first_ip_of_a_fresh_block_is_the_blocks_first_address(
    ipam: IPAM, store: LocalDatastore
) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [ip] = assign(ipam, "net.c1")
    assert ip.network.prefixlen == 26
    assert ip.ip == ip.network.network_address
    stored = block(store, str(ip.network))
    assert stored.allocations[0] == 0
    assert stored.attributes[0].handle_id == "net.c1"
    assert stored.attributes[0].secondary == ATTRS
    assert 0 not in stored.unallocated
    assert handle(store, "net.c1") == IPAMHandle({str(ip.network): 1})
    assert_consistent(store)


def test_released_ordinal_is_reused_last(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    first, second, third = (assign(ipam, f"h{i}")[0] for i in range(3))
    ipam.release_by_handle("h1")
    stored = block(store, str(first.network))
    assert stored.unallocated[-1] == 1
    [fourth] = assign(ipam, "h3")
    assert fourth.ip == third.ip + 1  # not the freed second.ip
    assert second.ip not in {first.ip, third.ip, fourth.ip}


def test_claimed_block_has_confirmed_affinity_and_claim_time(
    ipam: IPAM, store: LocalDatastore
) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [ip] = assign(ipam, "h")
    cidr = str(ip.network)
    assert affinity(store, NODE, cidr).state == "confirmed"
    stored = block(store, cidr)
    assert stored.affinity == f"host:{NODE}"
    assert stored.affinity_claim_time == "2023-11-14T22:13:20Z"
    assert stored.sequence_number_for_allocation == {"0": stored.sequence_number - 1}


def test_a_second_host_gets_a_different_block(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [a] = assign(ipam, "a", host="node1")
    [b] = assign(ipam, "b", host="node2")
    assert a.network != b.network
    assert block(store, str(b.network)).affinity == "host:node2"
    assert_consistent(store)


def test_host_keeps_using_its_affine_block(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    ips = [assign(ipam, f"h{i}")[0] for i in range(5)]
    assert {ip.network for ip in ips} == {ips[0].network}


def test_block_search_starts_at_a_hostname_seeded_position(store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/16")
    pool = store.get(ResourceKey("IPPool", "default")).value
    starts = {host: next(block_cidrs(pool, host)) for host in (f"node{i}" for i in range(8))}
    assert starts["node1"] == next(block_cidrs(pool, "node1"))  # stable for a host
    assert len(set(starts.values())) == 8  # different hosts start apart
    walk = list(block_cidrs(pool, "node1"))
    assert len(walk) == len(set(walk)) == 1024  # every block exactly once
    assert all(cidr.prefixlen == 26 and cidr.subnet_of(pool.network) for cidr in walk)


def test_fnv1_32_matches_the_reference_vectors() -> None:
    assert fnv1_32(b"") == 0x811C9DC5
    assert fnv1_32(b"a") == 0x050C5D7E
    assert fnv1_32(b"foobar") == 0x31F0B262


# --------------------------------------------------------------- borrowing


def _one_block_pool(store: LocalDatastore) -> None:
    add_pool(store, "tiny", "10.0.0.0/30", blockSize=30)


def test_borrows_from_another_hosts_block_without_strict_affinity(
    ipam: IPAM, store: LocalDatastore
) -> None:
    _one_block_pool(store)
    [a] = assign(ipam, "a", host="node1")
    [b] = assign(ipam, "b", host="node2")
    assert b.network == a.network
    assert block(store, "10.0.0.0/30").affinity == "host:node1"
    with pytest.raises(NotFound):
        affinity(store, "node2", "10.0.0.0/30")
    assert_consistent(store)


def test_strict_affinity_refuses_to_borrow(ipam: IPAM, store: LocalDatastore) -> None:
    _one_block_pool(store)
    set_config(store, strict_affinity=True)
    assign(ipam, "a", host="node1")
    v4, _ = ipam.auto_assign(AutoAssignRequest("b", "node2", ATTRS))
    assert v4.ips == []
    assert v4.shortfall_message(4) == (
        "Assigned 0 out of 1 requested IPv4 addresses; "
        "No more free affine blocks and strict affinity enabled"
    )
    assert handle(store, "b") is None


def test_exhausted_pool_reports_calicos_message(ipam: IPAM, store: LocalDatastore) -> None:
    _one_block_pool(store)
    for i in range(4):
        assign(ipam, f"h{i}")
    v4, _ = ipam.auto_assign(AutoAssignRequest("h4", NODE, ATTRS))
    assert v4.shortfall_message(4) == (
        "Assigned 0 out of 1 requested IPv4 addresses; No IPs available in pools: [10.0.0.0/30]"
    )


def test_block_limit_from_config_stops_claims_and_borrowing(
    ipam: IPAM, store: LocalDatastore
) -> None:
    add_pool(store, "small-blocks", "10.0.0.0/24", blockSize=30)
    set_config(store, max_blocks_per_host=1)
    for i in range(4):
        assign(ipam, f"h{i}")
    assign(ipam, "other", host="node2")  # a block with free space to borrow from exists
    with pytest.raises(IPAMError) as err:
        assign(ipam, "h4")
    assert (
        str(err.value)
        == BLOCK_LIMIT_MESSAGE
        == ("cannot allocate new block due to per host block limit")
    )
    assert handle(store, "h4") is None


def test_default_block_limit_is_20(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "small-blocks", "10.0.0.0/24", blockSize=30)
    v4, _ = ipam.auto_assign(AutoAssignRequest("many", NODE, ATTRS, num_v4=80))
    assert len(v4.ips) == 80
    assert len({ip.network for ip in v4.ips}) == 20
    with pytest.raises(IPAMError, match=BLOCK_LIMIT_MESSAGE):
        assign(ipam, "one-more")


def test_request_block_limit_applies(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "small-blocks", "10.0.0.0/24", blockSize=30)
    with pytest.raises(IPAMError, match=BLOCK_LIMIT_MESSAGE):
        ipam.auto_assign(AutoAssignRequest("h", NODE, ATTRS, num_v4=5, max_blocks_per_host=1))
    assert handle(store, "h") is None  # the four IPs taken before the error were given back
    [claimed] = store.list(BlockListOptions())
    assert claimed.value.allocated_ordinals() == []


def test_empty_block_of_another_host_is_reclaimed_after_a_minute(
    ipam: IPAM, store: LocalDatastore, clock: Clock
) -> None:
    _one_block_pool(store)
    set_config(store, strict_affinity=True)
    assign(ipam, "a", host="node1")
    ipam.release_by_handle("a")
    assert block(store, "10.0.0.0/30").affinity == "host:node1"  # empty but still affine
    clock.now += 59
    assert assign(ipam, "b", host="node2") == []
    clock.now += 1
    [ip] = assign(ipam, "b", host="node2")
    assert block(store, "10.0.0.0/30").affinity == "host:node2"
    with pytest.raises(NotFound):
        affinity(store, "node1", "10.0.0.0/30")
    assert str(ip.ip) == "10.0.0.0"
    assert_consistent(store)


def test_auto_allocate_blocks_off_only_borrows(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [a] = assign(ipam, "a", host="node1")
    set_config(store, auto_allocate_blocks=False)
    [b] = assign(ipam, "b", host="node2")
    assert b.network == a.network
    with pytest.raises(NotFound):
        affinity(store, "node2", str(a.network))


# ------------------------------------------------------------ reservations


def test_reserved_addresses_are_never_auto_assigned(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    reservation = IPReservation(ObjectMeta("r"), ["10.0.0.0/30", "10.0.0.64/26", "fd00::/64"])
    store.create(KVPair(ResourceKey("IPReservation", "r"), reservation))
    ips = [assign(ipam, f"h{i}")[0] for i in range(130)]
    addresses = {ip.ip for ip in ips}
    assert len(addresses) == 130
    reserved = [ipaddress.ip_network("10.0.0.0/30"), ipaddress.ip_network("10.0.0.64/26")]
    assert not any(a in net for a in addresses for net in reserved)
    with pytest.raises(NotFound):
        block(store, "10.0.0.64/26")  # a wholly reserved block is never claimed
    assert 0 in block(store, "10.0.0.0/26").unallocated  # reserved ordinals stay free


def test_assign_ip_ignores_reservations(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    reservation = IPReservation(ObjectMeta("r"), ["10.0.0.0/30"])
    store.create(KVPair(ResourceKey("IPReservation", "r"), reservation))
    assert str(ipam.assign_ip("10.0.0.1", "h", ATTRS, NODE)) == "10.0.0.1/26"


# ------------------------------------------------------------- specific IP


def test_assign_specific_free_ip(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    ip = ipam.assign_ip("10.0.0.77", "h", ATTRS, NODE)
    assert str(ip) == "10.0.0.77/26"
    stored = block(store, "10.0.0.64/26")
    assert stored.handle_of(13) == "h"
    assert stored.affinity == f"host:{NODE}"
    assert affinity(store, NODE, "10.0.0.64/26").state == "confirmed"
    assert ipam.ips_by_handle("h") == [ipaddress.ip_address("10.0.0.77")]
    assert_consistent(store)


def test_assign_specific_taken_ip_fails(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    ipam.assign_ip("10.0.0.77", "h1", ATTRS, NODE)
    with pytest.raises(IPAMError) as err:
        ipam.assign_ip("10.0.0.77", "h2", ATTRS, NODE)
    assert str(err.value) == "Address already assigned in block"
    assert handle(store, "h2") is None


def test_assign_specific_ip_outside_pools_fails(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    add_pool(store, "off", "10.9.0.0/24", disabled=True)
    for ip in ("192.168.1.1", "10.9.0.1"):
        with pytest.raises(IPAMError) as err:
            ipam.assign_ip(ip, "h", ATTRS, NODE)
        assert str(err.value) == "The provided IP address is not in a configured pool\n"


def test_assign_specific_ip_in_another_hosts_block(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    ipam.assign_ip("10.0.0.5", "a", ATTRS, "node1")
    assert str(ipam.assign_ip("10.0.0.6", "b", ATTRS, "node2")) == "10.0.0.6/26"
    set_config(store, strict_affinity=True)
    with pytest.raises(IPAMError, match=r"Block affinity \(host:node1\) does not match"):
        ipam.assign_ip("10.0.0.7", "c", ATTRS, "node2")


# ------------------------------------------------------------ pool choice


def test_requested_pool_by_name_and_by_cidr(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "pool-a", "10.0.0.0/24")
    add_pool(store, "pool-b", "10.1.0.0/24")
    [by_name] = assign(ipam, "h1", ipv4_pools=["pool-b"])
    [by_cidr] = assign(ipam, "h2", ipv4_pools=["10.1.0.0/24"])
    [default] = assign(ipam, "h3", host="node2")
    assert by_name.ip in ipaddress.ip_network("10.1.0.0/24")
    assert by_cidr.ip in ipaddress.ip_network("10.1.0.0/24")
    assert default.ip in ipaddress.ip_network("10.0.0.0/24")  # alphabetical: pool-a first


def test_requested_pools_are_used_in_the_requested_order(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "pool-a", "10.0.0.0/30", blockSize=30)
    add_pool(store, "pool-b", "10.1.0.0/30", blockSize=30)
    ips = [assign(ipam, f"h{i}", ipv4_pools=["pool-b", "pool-a"])[0] for i in range(5)]
    assert [str(ip.ip) for ip in ips] == [
        "10.1.0.0",
        "10.1.0.1",
        "10.1.0.2",
        "10.1.0.3",
        "10.0.0.0",
    ]


@pytest.mark.parametrize("wanted", ["10.9.0.0/16", "no-such-pool", "10.2.0.0/24"])
def test_unknown_or_disabled_requested_pool(ipam: IPAM, store: LocalDatastore, wanted: str) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    add_pool(store, "off", "10.2.0.0/24", disabled=True)
    with pytest.raises(IPAMError) as err:
        assign(ipam, "h", ipv4_pools=[wanted])
    assert str(err.value) == f"the given pool ({wanted}) does not exist, or is not enabled"


def test_node_selector_picks_the_pool(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "east", "10.0.0.0/24", nodeSelector="zone == 'east'")
    add_pool(store, "west", "10.1.0.0/24", nodeSelector="zone == 'west'")
    ipam.ensure_node("node1", {"zone": "west"})
    [ip] = assign(ipam, "h1")
    assert ip.ip in ipaddress.ip_network("10.1.0.0/24")
    ipam.ensure_node("node2", {"zone": "north"})
    with pytest.raises(IPAMError) as err:
        assign(ipam, "h2", host="node2")
    assert str(err.value) == "no configured Calico pools for node node2"


def test_namespace_selector_when_namespace_labels_given(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "a-team", "10.0.0.0/24", namespaceSelector="team == 'a'")
    add_pool(store, "b-team", "10.1.0.0/24", namespaceSelector="team == 'b'")
    [ip] = assign(ipam, "h", namespace_labels={"team": "b"})
    assert ip.ip in ipaddress.ip_network("10.1.0.0/24")


def test_disabled_pool_is_not_used(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "a-off", "10.0.0.0/24", disabled=True)
    add_pool(store, "b-on", "10.1.0.0/24")
    [ip] = assign(ipam, "h")
    assert ip.ip in ipaddress.ip_network("10.1.0.0/24")


def test_manual_pool_only_when_requested(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "manual", "10.0.0.0/24", assignmentMode="Manual")
    with pytest.raises(IPAMError, match="no configured Calico pools for node node1"):
        assign(ipam, "h1")
    [ip] = assign(ipam, "h2", ipv4_pools=["manual"])
    assert ip.ip in ipaddress.ip_network("10.0.0.0/24")


def test_allowed_uses_is_enforced(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "tunnels", "10.0.0.0/24", allowedUses=["Tunnel"])
    with pytest.raises(IPAMError) as err:
        assign(ipam, "h")
    assert str(err.value) == (
        "cannot find a qualified ippool, no pools match the required use (Workload)"
    )
    with pytest.raises(IPAMError) as err:
        ipam.assign_ip("10.0.0.9", "h", ATTRS, NODE)
    assert str(err.value) == (
        'IP address 10.0.0.9 is in IP pool "tunnels", which is not allowed for use '
        '"Workload" (allowedUses: [Tunnel])'
    )
    [ip] = assign(ipam, "t", intended_use="Tunnel")
    assert ip.ip in ipaddress.ip_network("10.0.0.0/24")


def test_missing_node_is_refused(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    with pytest.raises(IPAMError, match=r"Node\(ghost\)"):
        assign(ipam, "h", host="ghost")
    ipam.ensure_node("ghost")
    assert assign(ipam, "h", host="ghost")


# ------------------------------------------------------------- dual stack


def test_dual_stack_assigns_one_of_each(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "v4", "10.0.0.0/24")
    add_pool(store, "v6", "fd00::/120")
    v4, v6 = ipam.auto_assign(AutoAssignRequest("h", NODE, ATTRS, num_v6=1))
    assert [str(i) for i in v4.ips] == ["10.0.0.0/26"] or v4.ips[0].network.prefixlen == 26
    assert v6.ips[0].network.prefixlen == 122 and v6.ips[0].version == 6
    assert sorted(handle(store, "h").block) == sorted(
        [str(v4.ips[0].network), str(v6.ips[0].network)]
    )
    assert set(ipam.ips_by_handle("h")) == {v4.ips[0].ip, v6.ips[0].ip}


def test_failed_second_family_gives_back_the_first(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "v4", "10.0.0.0/24")
    with pytest.raises(IPAMError, match="no configured Calico pools for node node1"):
        ipam.auto_assign(AutoAssignRequest("h", NODE, ATTRS, num_v6=1))
    assert handle(store, "h") is None
    assert_consistent(store)


# ----------------------------------------------------------------- release


def test_release_by_handle_restores_state(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [keep] = assign(ipam, "keep")
    v4, _ = ipam.auto_assign(AutoAssignRequest("gone", NODE, ATTRS, num_v4=3))
    released = ipam.release_by_handle("gone")
    assert sorted(released) == sorted(ip.ip for ip in v4.ips)
    assert handle(store, "gone") is None
    stored = block(store, str(keep.network))
    assert stored.allocated_ordinals() == [0]
    assert len(stored.attributes) == 1 and stored.attributes[0].handle_id == "keep"
    assert sorted(stored.unallocated) == list(range(1, 64))
    assert stored.sequence_number_for_allocation.keys() == {"0"}
    with pytest.raises(NotFound):
        ipam.release_by_handle("gone")
    assert_consistent(store)


def test_empty_affine_block_is_kept_and_reused(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [a] = assign(ipam, "a")
    ipam.release_by_handle("a")
    assert block(store, str(a.network)).affinity == f"host:{NODE}"
    [b] = assign(ipam, "b")
    assert b.network == a.network


def test_release_ips_reports_unallocated(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    v4, _ = ipam.auto_assign(AutoAssignRequest("h", NODE, ATTRS, num_v4=2))
    first, second = (str(ip.ip) for ip in v4.ips)
    assert ipam.release_ips([first, "10.0.0.200", "192.168.0.1"]) == [
        "10.0.0.200",
        "192.168.0.1",
    ]
    assert handle(store, "h") == IPAMHandle({str(v4.ips[0].network): 1})
    assert ipam.ips_by_handle("h") == [ipaddress.ip_address(second)]
    assert_consistent(store)


def test_handle_ids_are_cut_at_the_first_carriage_return(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [ip] = assign(ipam, "net.abc\r\neth0")
    assert handle(store, "net.abc") is not None
    assert block(store, str(ip.network)).attributes[0].handle_id == "net.abc"
    # Old data (calico#3940): the block says "x\r\neth0", the handle is "x".
    assign(ipam, "net.old")
    kvp = store.get(BlockKey(ip.network))
    kvp.value.attributes[1].handle_id = "net.old\r\neth0"
    store.update(kvp)
    assert len(ipam.release_by_handle("net.old")) == 1
    assert block(store, str(ip.network)).allocated_ordinals() == [0]
    assert handle(store, "net.old") is None


def test_attrs_and_handle_listing_for_gc(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    assign(ipam, "net.c1")
    assign(ipam, "net.c2", host="node2")
    assert ipam.list_handles() == ["net.c1", "net.c2"]
    assert ipam.attrs_for_handle("net.c1") == ATTRS


# -------------------------------------------------- affinity maintenance


def test_stale_affinity_is_removed(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [theirs] = assign(ipam, "b", host="node2")
    stale = BlockAffinityKey("node1", theirs.network)
    store.create(KVPair(stale, BlockAffinity("confirmed")))
    [mine] = assign(ipam, "a", host="node1")
    assert mine.network != theirs.network
    with pytest.raises(NotFound):
        store.get(stale)
    assert_consistent(store)


def test_pending_affinity_is_confirmed_on_next_use(ipam: IPAM, store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    [ip] = assign(ipam, "a")
    key = BlockAffinityKey(NODE, ip.network)
    store.update(KVPair(key, BlockAffinity("pending"), None))
    [again] = assign(ipam, "b")
    assert again.network == ip.network
    assert store.get(key).value.state == "confirmed"


def test_affinity_without_block_recreates_the_block(ipam: IPAM, store: LocalDatastore) -> None:
    """A crash between claiming the affinity and creating the block."""
    add_pool(store, "default", "10.0.0.0/24")
    cidr = ipaddress.ip_network("10.0.0.128/26")
    store.create(KVPair(BlockAffinityKey(NODE, cidr), BlockAffinity("pending")))
    [ip] = assign(ipam, "a")
    assert ip.network == cidr
    assert store.get(BlockAffinityKey(NODE, cidr)).value.state == "confirmed"
    assert_consistent(store)


def test_empty_block_of_a_pool_that_no_longer_selects_the_node_is_released(
    ipam: IPAM, store: LocalDatastore
) -> None:
    add_pool(store, "a", "10.0.0.0/24")
    [ip] = assign(ipam, "h")
    ipam.release_by_handle("h")
    kvp = store.get(ResourceKey("IPPool", "a"))
    kvp.value.spec.node_selector = "zone == 'elsewhere'"
    store.update(kvp)
    add_pool(store, "b", "10.1.0.0/24")
    assign(ipam, "h2")
    with pytest.raises(NotFound):
        store.get(BlockAffinityKey(NODE, ip.network))
    with pytest.raises(NotFound):
        store.get(BlockKey(ip.network))


# ------------------------------------------------------ compare-and-swap


class RacingStore:
    """Delegates to a real store, but lets another writer bump a block first."""

    def __init__(self, inner: LocalDatastore, races: int) -> None:
        self.inner = inner
        self.races = races
        self.conflicts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update(self, kvp: KVPair) -> KVPair:
        if isinstance(kvp.key, BlockKey) and self.races > 0:
            self.races -= 1
            current = self.inner.get(kvp.key)
            current.value.sequence_number += 1
            self.inner.update(current)  # a concurrent writer wins the race
        try:
            return self.inner.update(kvp)
        except Conflict:
            self.conflicts += 1
            raise


def test_block_cas_conflict_is_retried(store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    IPAM(store).ensure_node(NODE)
    [first] = assign(IPAM(store), "first")
    racing = RacingStore(store, races=1)
    [ip] = assign(IPAM(racing), "second")  # type: ignore[arg-type]
    assert racing.conflicts == 1
    assert ip.ip == first.ip + 1
    assert handle(store, "second") == IPAMHandle({str(ip.network): 1})  # decremented, re-added
    assert_consistent(store)


class AbandonedClaimStore:
    """Delegates to a real store, but has another claimer for the same host create the
    block's pending affinity just before this one and give it up just after."""

    def __init__(self, inner: LocalDatastore) -> None:
        self.inner = inner
        self.abandoned: KVPair | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def create(self, kvp: KVPair) -> KVPair:
        if isinstance(kvp.key, BlockAffinityKey) and self.abandoned is None:
            self.abandoned = self.inner.create(kvp)
            raise AlreadyExists(str(kvp.key))
        return self.inner.create(kvp)

    def get(self, key: Any) -> KVPair:
        if self.abandoned is not None and key == self.abandoned.key:
            self.inner.delete(self.abandoned)  # the other claimer lost its block elsewhere
        return self.inner.get(key)


def test_an_affinity_given_up_while_claiming_is_claimed_again(store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    IPAM(store).ensure_node(NODE)
    racing = AbandonedClaimStore(store)
    [ip] = assign(IPAM(racing), "first")  # type: ignore[arg-type]
    assert racing.abandoned is not None
    assert affinity(store, NODE, str(ip.network)).state == "confirmed"
    assert_consistent(store)


def test_endless_conflicts_hit_max_retries(store: LocalDatastore) -> None:
    add_pool(store, "default", "10.0.0.0/24")
    IPAM(store).ensure_node(NODE)
    assign(IPAM(store), "first")
    racing = RacingStore(store, races=10_000)
    with pytest.raises(IPAMError) as err:
        assign(IPAM(racing), "second")  # type: ignore[arg-type]
    assert str(err.value) == MAX_RETRIES_MESSAGE
    assert racing.conflicts == 100
    assert handle(store, "second") is None
    assert_consistent(store)
