"""The engine's cost does not grow with the blocks, and its hints never decide an address.

A counting wrapper around a real SQLite datastore records every request the engine
makes, so the tests can assert how much an ADD reads on a node with 5 blocks and with 60,
and what happens when the hints are cold, stale, lying, or outrun by another writer.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipam_plugin.engine import IPAM, AutoAssignRequest, BlockHints, HostHints
from ipam_plugin.inspect import assignment, check_consistency
from libcalico.datastore.base import Answer, Datastore, KVPair, Read
from libcalico.datastore.local import LocalDatastore
from libcalico.model import (
    BlockAffinityListOptions,
    BlockKey,
    BlockListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPPool,
    IPReservation,
    Key,
    ListOptions,
    ObjectMeta,
    ResourceKey,
)

NODE = "node1"
POOL = "10.20.0.0/20"  # 256 blocks of 16
BLOCK = 16


class CountingStore(Datastore):
    """A real datastore, with every request counted: a batched read counts once (one
    round trip on etcd) but each object it returns is counted too."""

    def __init__(self, inner: LocalDatastore) -> None:
        self.inner = inner
        self.requests: Counter[str] = Counter()
        self.blocks_read = 0
        self.block_lists = 0

    def reset(self) -> None:
        self.requests.clear()
        self.blocks_read = self.block_lists = 0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def _blocks(self, pairs: Sequence[Answer]) -> None:
        self.blocks_read += sum(
            1 for kvp in pairs if isinstance(kvp, KVPair) and isinstance(kvp.key, BlockKey)
        )

    def get(self, key: Key) -> KVPair:
        self.requests["get"] += 1
        kvp = self.inner.get(key)
        self._blocks([kvp])
        return kvp

    def list(self, options: ListOptions) -> list[KVPair]:
        self.requests["list"] += 1
        self.block_lists += isinstance(options, BlockListOptions)
        pairs = self.inner.list(options)
        self._blocks(pairs)
        return pairs

    def read_many(self, reads: Sequence[Read]) -> list[Answer]:
        self.requests["read_many"] += 1
        self.block_lists += sum(isinstance(r, BlockListOptions) for r in reads)
        answers = self.inner.read_many(reads)
        self._blocks(answers)
        return answers

    def revisions(self, keys: Sequence[Key]) -> dict[Key, str]:
        self.requests["revisions"] += 1
        return self.inner.revisions(keys)

    def create(self, kvp: KVPair) -> KVPair:
        self.requests["create"] += 1
        return self.inner.create(kvp)

    def update(self, kvp: KVPair) -> KVPair:
        self.requests["update"] += 1
        return self.inner.update(kvp)

    def delete(self, kvp: KVPair) -> None:
        self.requests["delete"] += 1
        self.inner.delete(kvp)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalDatastore]:
    with LocalDatastore(str(tmp_path / "calico.db")) as store:
        doc = {"metadata": {"name": "pool"}, "spec": {"cidr": POOL, "blockSize": 28}}
        store.create(KVPair(ResourceKey("IPPool", "pool"), IPPool.from_json(doc)))
        config = IPAMConfig(strict_affinity=True, max_blocks_per_host=200)
        store.create(KVPair(IPAMConfigKey(), config))
        yield store


@pytest.fixture
def counting(local: LocalDatastore) -> CountingStore:
    return CountingStore(local)


def assign(ipam: IPAM, handle: str, host: str = NODE, num: int = 1) -> list[str]:
    v4, _ = ipam.auto_assign(AutoAssignRequest(handle, host, {"node": host}, num_v4=num))
    assert len(v4.ips) == num, v4.msgs
    return [str(ip.ip) for ip in v4.ips]


def fill_node(store: Datastore, host: str, blocks: int, spare: int = 0) -> list[str]:
    """`blocks` blocks on `host`, every one full except `spare` addresses in the last."""
    ipam = IPAM(store)
    ipam.ensure_node(host)
    return assign(ipam, f"fill.{host}", host, blocks * BLOCK - spare)


def affine_blocks(store: Datastore, host: str = NODE) -> set[str]:
    return {str(kvp.key.cidr) for kvp in store.list(BlockAffinityListOptions(host, 4))}


def assert_consistent(store: Datastore) -> None:
    report = check_consistency(store)
    assert report.ok, report


@pytest.mark.parametrize("blocks", [5, 60])
def test_an_add_on_a_node_with_many_blocks_costs_what_it_costs_on_one_with_few(
    local: LocalDatastore, counting: CountingStore, blocks: int
) -> None:
    fill_node(local, NODE, blocks, spare=4)
    ipam = IPAM(counting)
    assign(ipam, "warm")  # the first call learns the node's blocks
    counting.reset()
    [ip] = assign(ipam, "measured")
    # One batched read (config, reservations, Node, pools, the hinted block and its
    # affinity), the handle, the block: whatever the number of blocks.
    assert counting.requests == {"read_many": 1, "create": 1, "update": 1}
    assert counting.blocks_read == 1
    assert len(affine_blocks(local)) == blocks  # the spare room used, nothing claimed
    assert any(ipaddress.ip_address(ip) in ipaddress.ip_network(c) for c in affine_blocks(local))
    assert_consistent(local)


def test_cold_hints_read_the_blocks_in_batches_and_find_the_one_with_room(
    local: LocalDatastore, counting: CountingStore
) -> None:
    fill_node(local, NODE, 60, spare=1)
    [ip] = assign(IPAM(counting), "cold")
    assert counting.block_lists == 0
    assert counting.requests["get"] == 0  # no block read one by one
    [spare_block] = [
        kvp.value
        for kvp in local.list(BlockListOptions())
        if ipaddress.ip_address(ip) in kvp.value.cidr
    ]
    assert not spare_block.unallocated  # the one spare address is the one handed out
    assert len(affine_blocks(local)) == 60  # no block claimed
    assert_consistent(local)


def test_an_address_freed_behind_the_hints_is_used_before_a_new_block_is_claimed(
    local: LocalDatastore, counting: CountingStore
) -> None:
    fill_node(local, NODE, 40)
    IPAM(local).ensure_node(NODE)
    ipam = IPAM(counting)
    first = assign(ipam, "a")  # every block full: a new block is claimed
    blocks = affine_blocks(local)
    assign(ipam, "b", num=BLOCK - 1)  # ... and filled
    other_block = next(
        c for c in blocks if ipaddress.ip_address(first[0]) not in ipaddress.ip_network(c)
    )
    freed = str(ipaddress.ip_network(other_block).network_address + 5)
    assert IPAM(local).release_ips([freed]) == []  # another writer, not this engine
    counting.reset()
    assert assign(ipam, "c") == [freed]
    assert affine_blocks(local) == blocks
    # Full blocks are checked by revision alone; only the one that changed is read.
    assert counting.requests["revisions"] == 1
    assert counting.blocks_read <= 3
    assert_consistent(local)


def test_a_full_node_claims_its_next_block_without_checking_its_own_blocks_again(
    local: LocalDatastore, counting: CountingStore
) -> None:
    fill_node(local, NODE, 60)
    ipam = IPAM(counting)
    assign(ipam, "warm")  # learns the 60 full blocks, claims a 61st
    assign(IPAM(local), "other", num=BLOCK - 1)  # another writer fills the 61st
    counting.reset()
    assign(ipam, "claims")
    assert len(affine_blocks(local)) == 62
    # One revision check of the full blocks, one of the first candidates of the walk:
    # the node's own 61 blocks, where its walk starts, are not checked for existence.
    assert counting.requests["revisions"] == 2
    assert counting.block_lists == 0
    assert_consistent(local)


def test_a_block_filled_by_another_writer_is_skipped(local: LocalDatastore) -> None:
    fill_node(local, NODE, 3, spare=5)
    mine, theirs = IPAM(local), IPAM(local)
    assign(mine, "warm")  # mine believes the last block has 4 free addresses
    taken = set(assign(theirs, "other", num=4))  # another engine takes them
    [ip] = assign(mine, "next")
    assert ip not in taken
    assert len(affine_blocks(local)) == 4  # it found no room, so it claimed
    assert_consistent(local)


def test_hints_that_lie_cost_reads_never_an_address(local: LocalDatastore) -> None:
    owned = set(fill_node(local, NODE, 3, spare=2))
    other = fill_node(local, "node2", 1)
    hints = BlockHints()
    lies = hints.of(NODE, 4)
    for cidr in affine_blocks(local):
        lies.blocks[cidr] = ("1", BLOCK)  # every block "empty", at a made-up revision
    lies.blocks[str(ipaddress.ip_interface(f"{other[0]}/28").network)] = ("1", BLOCK)
    lies.blocks["10.20.15.0/28"] = ("1", BLOCK)  # a block that does not exist
    ips = assign(IPAM(local, hints=hints), "h", num=3)
    assert not set(ips) & (owned | set(other))
    assert len(set(ips)) == 3
    assert_consistent(local)


def test_a_new_node_claims_without_reading_the_pools_blocks(
    local: LocalDatastore, counting: CountingStore
) -> None:
    for i in range(12):
        fill_node(local, f"other{i}", 10)  # 120 of the pool's 256 blocks taken
    IPAM(local).ensure_node(NODE)
    [ip] = assign(IPAM(counting), "first")
    assert counting.block_lists == 0
    assert counting.blocks_read <= 1
    [block] = affine_blocks(local)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(block)
    assert_consistent(local)


def test_a_pool_with_no_cidr_left_falls_back_to_reading_every_block(
    local: LocalDatastore, counting: CountingStore
) -> None:
    config = local.get(IPAMConfigKey())
    config.value.max_blocks_per_host = 300
    local.update(config)
    ips = fill_node(local, "node2", 256)  # the whole pool
    IPAM(local).ensure_node(NODE)
    IPAM(local).release_ips(ips[:1])  # one free address, in node2's block
    v4, _ = IPAM(counting).auto_assign(AutoAssignRequest("h", NODE, {"node": NODE}))
    assert v4.ips == []  # strict affinity: no borrowing
    assert v4.msgs == ["No more free affine blocks and strict affinity enabled"]
    assert counting.block_lists == 1  # Calico's scan, for blocks to reclaim
    assert_consistent(local)


def test_a_new_reservation_set_starts_the_hints_again(local: LocalDatastore) -> None:
    fill_node(local, NODE, 2, spare=2)
    ipam = IPAM(local)
    last = max(affine_blocks(local), key=lambda c: ipaddress.ip_network(c))
    spare = [str(ipaddress.ip_network(last).network_address + o) for o in (14, 15)]
    reservation = IPReservation(ObjectMeta("r", {}), reserved_cidrs=[f"{s}/32" for s in spare])
    local.create(KVPair(ResourceKey("IPReservation", "r"), reservation))
    [claimed] = assign(ipam, "a")  # both spare addresses reserved: a new block
    assert claimed not in spare
    local.delete(local.get(ResourceKey("IPReservation", "r")))
    ipam.release_ips([claimed])
    assert assign(ipam, "b", num=2) == spare  # usable again, before the new block
    assert_consistent(local)


def test_a_pool_that_stops_selecting_the_node_is_noticed_by_a_warm_engine(
    local: LocalDatastore,
) -> None:
    ipam = IPAM(local)
    ipam.ensure_node(NODE)
    assign(ipam, "h")
    ipam.release_by_handle("h")
    pool = local.get(ResourceKey("IPPool", "pool"))
    pool.value.spec.node_selector = "zone == 'elsewhere'"
    local.update(pool)
    doc = {"metadata": {"name": "b"}, "spec": {"cidr": "10.30.0.0/24", "blockSize": 28}}
    local.create(KVPair(ResourceKey("IPPool", "b"), IPPool.from_json(doc)))
    [other] = assign(ipam, "h2")
    assert ipaddress.ip_address(other) in ipaddress.ip_network("10.30.0.0/24")
    assert affine_blocks(local) == {str(ipaddress.ip_interface(f"{other}/28").network)}


def test_node_labels_that_stop_a_pool_selecting_it_are_noticed_by_a_warm_engine(
    local: LocalDatastore,
) -> None:
    pool = local.get(ResourceKey("IPPool", "pool"))
    pool.value.spec.node_selector = "zone == 'a'"
    local.update(pool)
    spec = {"cidr": "10.30.0.0/24", "blockSize": 28, "nodeSelector": "zone == 'b'"}
    doc = {"metadata": {"name": "b"}, "spec": spec}
    local.create(KVPair(ResourceKey("IPPool", "b"), IPPool.from_json(doc)))
    ipam = IPAM(local)
    ipam.ensure_node(NODE, {"zone": "a"})
    [ip] = assign(ipam, "h")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POOL)
    ipam.release_by_handle("h")
    ipam.ensure_node(NODE, {"zone": "b"})
    [other] = assign(ipam, "h2")
    assert ipaddress.ip_address(other) in ipaddress.ip_network("10.30.0.0/24")
    assert affine_blocks(local) == {str(ipaddress.ip_interface(f"{other}/28").network)}


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "text",
        {"scope": "s"},
        {"scope": "s", "hosts": {"n": {"4": {"blocks": {"not-a-cidr": ["1", 2]}}}}},
        {"scope": "s", "hosts": {"n": {"4": {"selection": "", "reserved": "", "blocks": 5}}}},
        {"scope": "s", "hosts": {"n": {"x": {}}}},
    ],
)
def test_damaged_or_foreign_hints_load_as_none(doc: Any) -> None:
    assert BlockHints.from_json(doc, "s").to_json() == {"scope": "s", "hosts": {}}


def test_hints_round_trip_and_belong_to_one_datastore() -> None:
    hints = BlockHints("etcdv3 http://a:2379")
    hints.note("n", ipaddress.ip_network("10.0.0.0/26"), "42", 3)
    hints.listed("n", 4, [ipaddress.ip_network("10.0.0.0/26")], "pool@1 node@2")
    doc = hints.to_json()
    again = BlockHints.from_json(doc, "etcdv3 http://a:2379")
    assert again.of("n", 4) == HostHints({"10.0.0.0/26": ("42", 3)}, "pool@1 node@2", "")
    assert BlockHints.from_json(doc, "local /x.db").to_json()["hosts"] == {}


def test_hints_keep_a_bounded_number_of_hosts() -> None:
    hints = BlockHints()
    for i in range(BlockHints.MAX_HOSTS + 5):
        hints.note(f"n{i}", ipaddress.ip_network("10.0.0.0/26"), "1", 1)
    assert len(hints.to_json()["hosts"]) == BlockHints.MAX_HOSTS
    assert f"n{BlockHints.MAX_HOSTS + 4}" in hints.to_json()["hosts"]


def test_the_owner_of_an_address_is_read_from_its_block_alone(
    local: LocalDatastore, counting: CountingStore
) -> None:
    ips = fill_node(local, NODE, 30)
    assert assignment(counting, ips[100]).handle_id == f"fill.{NODE}"
    assert counting.blocks_read == 1 and counting.block_lists == 0
    assert assignment(counting, "10.20.15.250") is None  # in the pool, in no block
    local.delete(local.get(ResourceKey("IPPool", "pool")))  # a block outside every pool
    assert assignment(local, ips[100]).handle_id == f"fill.{NODE}"
