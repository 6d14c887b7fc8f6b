"""Random assign / release / claim sequences across hosts and pools keep IPAM consistent.

Three engines share the datastore: two keep their block hints from call to call (like two
nodes' agents, or an agent and real Calico), the third starts cold every time, so each
engine's hints are regularly outrun by the others' writes."""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ipam_plugin.engine import IPAM, AutoAssignRequest, IPAMError
from ipam_plugin.inspect import check_consistency
from libcalico.datastore.base import KVPair, NotFound
from libcalico.datastore.local import LocalDatastore
from libcalico.model import BlockListOptions, IPAMConfig, IPAMConfigKey, IPPool, ResourceKey

HOSTS = ("node1", "node2", "node3")
POOLS = {"p1": ("10.0.0.0/28", 30), "p2": ("10.1.0.0/29", 29)}
ENGINES = st.integers(0, 2)
ALL_ADDRESSES = [str(ip) for cidr, _ in POOLS.values() for ip in ipaddress.ip_network(cidr)] + [
    "192.168.7.7"
]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class IPAMMachine(RuleBasedStateMachine):
    """`expected` maps every address we were handed to its handle: the ground truth."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="ipam-prop-")
        self.store = LocalDatastore(str(Path(self.directory) / "calico.db"))
        self.clock = Clock()
        self.warm = [IPAM(self.store, clock=self.clock) for _ in range(2)]
        self.ipam = self.warm[0]
        self.expected: dict[str, str] = {}
        self.handles = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory)

    @initialize(strict=st.booleans(), max_blocks=st.sampled_from([0, 1, 2]))
    def configure(self, strict: bool, max_blocks: int) -> None:
        config = IPAMConfig(strict_affinity=strict, max_blocks_per_host=max_blocks)
        self.store.create(KVPair(IPAMConfigKey(), config))
        for name, (cidr, block_size) in POOLS.items():
            doc = {"metadata": {"name": name}, "spec": {"cidr": cidr, "blockSize": block_size}}
            self.store.create(KVPair(ResourceKey("IPPool", name), IPPool.from_json(doc)))
        for host in HOSTS:
            self.ipam.ensure_node(host)

    def _engine(self, which: int) -> IPAM:
        """A warm engine (0, 1) or a cold one (2)."""
        return self.warm[which] if which < len(self.warm) else IPAM(self.store, clock=self.clock)

    def _new_handle(self) -> str:
        self.handles += 1
        return f"net.c{self.handles}"

    def _existing_handle(self, index: int) -> str | None:
        handles = sorted(set(self.expected.values()))
        return handles[index % len(handles)] if handles else None

    @rule(
        host=st.sampled_from(HOSTS),
        num=st.integers(1, 3),
        pools=st.sampled_from([[], ["p1"], ["p2"], ["p2", "p1"]]),
        reuse=st.none() | st.integers(0, 50),
        engine=ENGINES,
    )
    def auto_assign(
        self, host: str, num: int, pools: list[str], reuse: int | None, engine: int
    ) -> None:
        handle_id = (self._existing_handle(reuse) if reuse is not None else None) or (
            self._new_handle()
        )
        request = AutoAssignRequest(handle_id, host, {"node": host}, num_v4=num, ipv4_pools=pools)
        try:
            v4, _ = self._engine(engine).auto_assign(request)
        except IPAMError as err:
            assert "per host block limit" in str(err)
            return
        for ip in v4.ips:
            address = str(ip.ip)
            assert address not in self.expected, f"{address} handed out twice"
            self.expected[address] = handle_id
        assert len(v4.ips) == num or v4.msgs

    @rule(host=st.sampled_from(HOSTS), address=st.sampled_from(ALL_ADDRESSES), engine=ENGINES)
    def assign_ip(self, host: str, address: str, engine: int) -> None:
        handle_id = self._new_handle()
        try:
            ip = self._engine(engine).assign_ip(address, handle_id, {"node": host}, host)
        except IPAMError as err:
            assert (
                address in self.expected
                or address == "192.168.7.7"
                or "does not match provided" in str(err)
            ), str(err)
            return
        assert address not in self.expected
        assert str(ip.ip) == address
        self.expected[address] = handle_id

    @rule(index=st.integers(0, 50), engine=ENGINES)
    def release_by_handle(self, index: int, engine: int) -> None:
        handle_id = self._existing_handle(index)
        if handle_id is None:
            return
        released = {str(ip) for ip in self._engine(engine).release_by_handle(handle_id)}
        assert released == {a for a, h in self.expected.items() if h == handle_id}
        for address in released:
            del self.expected[address]

    @rule(address=st.sampled_from(ALL_ADDRESSES), engine=ENGINES)
    def release_ip(self, address: str, engine: int) -> None:
        unallocated = self._engine(engine).release_ips([address])
        assert unallocated == ([] if address in self.expected else [address])
        self.expected.pop(address, None)

    @rule(index=st.integers(0, 50))
    def release_missing_handle(self, index: int) -> None:
        try:
            self.ipam.release_by_handle(f"never-{index}")
        except NotFound:
            return
        raise AssertionError("released a handle that never existed")

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def datastore_is_consistent(self) -> None:
        report = check_consistency(self.store)
        assert report.ok, report

    @invariant()
    def store_matches_what_was_handed_out(self) -> None:
        held: dict[str, str | None] = {}
        for kvp in self.store.list(BlockListOptions()):
            block = kvp.value
            for ordinal in block.allocated_ordinals():
                address = str(block.ip(ordinal))
                assert address not in held, f"{address} allocated in two blocks"
                held[address] = block.handle_of(ordinal)
        assert held == self.expected


IPAMMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestIPAMProperties = IPAMMachine.TestCase
