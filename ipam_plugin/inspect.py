"""Read-only IPAM views for the admin commands (`ipam show`, `ipam check`).

Kept apart from the engine: these scan the whole datastore, which the per-invocation
allocation path must never do.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field

from libcalico.datastore.base import Datastore, NotFound
from libcalico.model import (
    AllocationAttribute,
    AllocationBlock,
    BlockAffinityListOptions,
    BlockListOptions,
    HandleListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPPool,
    ResourceListOptions,
)


@dataclass
class BlockUsage:
    """Addresses of one block: total, in use, free."""

    cidr: str
    affinity: str | None
    pool: str | None  # name of the pool containing the block, if any
    total: int
    in_use: int

    @property
    def free(self) -> int:
        return self.total - self.in_use


@dataclass
class PoolUsage:
    """Addresses of one pool, summed over its blocks."""

    name: str
    cidr: str
    total: int
    in_use: int
    blocks: list[BlockUsage] = field(default_factory=list)

    @property
    def free(self) -> int:
        return self.total - self.in_use


def ipam_config(store: Datastore) -> IPAMConfig:
    """The effective IPAMConfig (Calico's defaults when none is stored)."""
    try:
        return store.get(IPAMConfigKey()).value
    except NotFound:
        return IPAMConfig()


def _blocks(store: Datastore) -> list[AllocationBlock]:
    return [kvp.value for kvp in store.list(BlockListOptions())]


def _pools(store: Datastore) -> list[IPPool]:
    return [kvp.value for kvp in store.list(ResourceListOptions("IPPool"))]


def block_usage(store: Datastore) -> list[BlockUsage]:
    pools = _pools(store)
    usage = []
    for block in _blocks(store):
        pool = next(
            (
                p
                for p in pools
                if p.network.version == block.cidr.version and block.cidr.subnet_of(p.network)
            ),
            None,
        )
        usage.append(
            BlockUsage(
                cidr=str(block.cidr),
                affinity=block.affinity,
                pool=pool.name if pool else None,
                total=block.cidr.num_addresses,
                in_use=len(block.allocated_ordinals()),
            )
        )
    return usage


def pool_usage(store: Datastore) -> list[PoolUsage]:
    """Per pool: addresses in the pool, in use (allocated in its blocks), and free."""
    blocks = block_usage(store)
    result = []
    for pool in _pools(store):
        mine = [b for b in blocks if b.pool == pool.name]
        result.append(
            PoolUsage(
                name=pool.name,
                cidr=pool.spec.cidr,
                total=pool.network.num_addresses,
                in_use=sum(b.in_use for b in mine),
                blocks=mine,
            )
        )
    return result


@dataclass
class LeakedAllocation:
    """An allocated address whose handle object does not exist."""

    ip: str
    handle_id: str | None
    block: str


@dataclass
class HandleMismatch:
    """A handle's recorded count for a block differs from the block's allocations."""

    handle_id: str
    block: str
    recorded: int
    allocated: int


@dataclass
class AffinityProblem:
    """An affinity without its block, or one the block disagrees with."""

    host: str
    cidr: str
    problem: str


@dataclass
class ConsistencyReport:
    """Everything `ipam check` found; `ok` when empty."""

    leaked: list[LeakedAllocation] = field(default_factory=list)
    handle_mismatches: list[HandleMismatch] = field(default_factory=list)
    affinity_problems: list[AffinityProblem] = field(default_factory=list)
    malformed_blocks: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return (
            len(self.leaked)
            + len(self.handle_mismatches)
            + len(self.affinity_problems)
            + len(self.malformed_blocks)
        )

    @property
    def ok(self) -> bool:
        return self.problems == 0


def _block_is_well_formed(block: AllocationBlock) -> bool:
    """`allocations` and `unallocated` partition the ordinals; attribute indexes resolve."""
    size = block.cidr.num_addresses
    allocated = set(block.allocated_ordinals())
    free = block.unallocated
    return (
        len(block.allocations) == size
        and len(free) == len(set(free))
        and set(free) | allocated == set(range(size))
        and not set(free) & allocated
        and all(i is None or 0 <= i < len(block.attributes) for i in block.allocations)
    )


def check_consistency(store: Datastore) -> ConsistencyReport:
    """Cross-check handles, blocks and affinities the way `calicoctl ipam check` does."""
    report = ConsistencyReport()
    handles = {kvp.key.handle_id: kvp.value.block for kvp in store.list(HandleListOptions())}
    allocated: Counter[tuple[str, str]] = Counter()
    blocks = {str(b.cidr): b for b in _blocks(store)}
    for cidr, block in blocks.items():
        if not _block_is_well_formed(block):
            report.malformed_blocks.append(cidr)
            continue
        for ordinal in block.allocated_ordinals():
            handle_id = block.handle_of(ordinal)
            if handle_id is None or handle_id not in handles:
                report.leaked.append(LeakedAllocation(str(block.ip(ordinal)), handle_id, cidr))
            else:
                allocated[handle_id, cidr] += 1
    for handle_id, counts in handles.items():
        for cidr, recorded in counts.items():
            if allocated[handle_id, cidr] != recorded:
                report.handle_mismatches.append(
                    HandleMismatch(handle_id, cidr, recorded, allocated[handle_id, cidr])
                )
    confirmed: Counter[str] = Counter()
    for kvp in store.list(BlockAffinityListOptions()):
        host, cidr = kvp.key.host, str(kvp.key.cidr)
        block = blocks.get(cidr)
        if block is None:
            report.affinity_problems.append(AffinityProblem(host, cidr, "no block"))
        elif block.affinity != f"host:{host}":
            report.affinity_problems.append(
                AffinityProblem(host, cidr, f"block is affine to {block.affinity}")
            )
        elif kvp.value.is_confirmed():
            confirmed[cidr] += 1
    for cidr, block in blocks.items():
        if block.affinity and block.affinity.startswith("host:") and confirmed[cidr] != 1:
            host = block.affinity.removeprefix("host:")
            report.affinity_problems.append(
                AffinityProblem(host, cidr, f"{confirmed[cidr]} confirmed affinities for block")
            )
    return report


def assignment(store: Datastore, ip: str) -> AllocationAttribute | None:
    """The owner of `ip` (handle and workload), read from the block that contains it, or
    None: for `ipam show --ip`."""
    address = ipaddress.ip_address(ip)
    for kvp in store.list(BlockListOptions(address.version)):
        block = kvp.value
        if address in block.cidr:
            index = block.allocations[block.ordinal(address)]
            return None if index is None else block.attributes[index]
    return None
