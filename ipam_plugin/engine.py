"""Calico's IPAM algorithm (libcalico-go `lib/ipam`) over the Datastore interface.

Pure: no netlink, no CNI, no root. Every datastore write is a compare-and-swap; a lost
race re-reads and retries (at most `RETRIES` times), exactly as Calico does, so many
processes and nodes can allocate from one datastore without handing out an IP twice.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from libcalico.datastore.base import AlreadyExists, Conflict, Datastore, KVPair, NotFound
from libcalico.model import (
    STATE_CONFIRMED,
    STATE_PENDING,
    STATE_PENDING_DELETION,
    AddressInUse,
    AllocationBlock,
    BlockAffinity,
    BlockAffinityKey,
    BlockAffinityListOptions,
    BlockKey,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    IPAddress,
    IPAMConfig,
    IPAMConfigKey,
    IPAMHandle,
    IPNetwork,
    IPPool,
    IPReservation,
    Node,
    ObjectMeta,
    Reservations,
    ResourceKey,
    ResourceListOptions,
    host_affinity,
    sanitize_handle_id,
)
from libcalico.selector import SelectorError, selector_matches

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
T = TypeVar("T")

RETRIES = 100
DEFAULT_MAX_BLOCKS_PER_HOST = 20
EMPTY_BLOCK_MIN_RECLAIM_AGE = 60.0
MAX_RETRIES_MESSAGE = "Max retries hit - excessive concurrent IPAM requests"
BLOCK_LIMIT_MESSAGE = "cannot allocate new block due to per host block limit"
NOT_IN_POOL_MESSAGE = "The provided IP address is not in a configured pool\n"


class IPAMError(Exception):
    """An allocation failure; str(e) is Calico's message, word for word."""


class IPAMRequestError(IPAMError):
    """The request names a pool or address that cannot be used as asked: a config error."""


class IPAMRetriesExhausted(IPAMError):
    """CAS kept failing under concurrent writers: transient, worth retrying later."""


class _NoFreeBlocks(Exception):
    """No block can be found or claimed; not an error, the caller goes on to borrow."""


class _ClaimConflict(Exception):
    """Another host claimed the block first: pick another block."""


_RETRYABLE = (Conflict, AlreadyExists, _ClaimConflict)


def _with_retries(attempt: Callable[[], T]) -> T:
    """Run a read-modify-write until it stops losing compare-and-swap races."""
    for _ in range(RETRIES):
        try:
            return attempt()
        except _RETRYABLE:
            continue
    raise IPAMRetriesExhausted(MAX_RETRIES_MESSAGE)


def _add(delta: int) -> Callable[[int], int]:
    return lambda count: count + delta


def _go_list(items: list[str]) -> str:
    """Format like Go's %v of a []string, as Calico's messages do."""
    return "[" + " ".join(items) + "]"


def _rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _parse_rfc3339(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fnv1_32(data: bytes) -> int:
    """32-bit FNV-1 (multiply, then xor): Calico's hostname seed for block search."""
    value = 0x811C9DC5
    for byte in data:
        value = (value * 0x01000193) & 0xFFFFFFFF
        value ^= byte
    return value


def _mix64(seed: int) -> int:
    """One splitmix64 step. Go's math/rand stream cannot be reproduced without its
    seed table; what matters is a stable, well-spread start index per hostname."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def block_cidrs(pool: IPPool, hostname: str) -> Iterator[IPNetwork]:
    """Every block CIDR of the pool once, starting at a hostname-seeded random index and
    wrapping round, so hosts spread over the pool instead of racing for the same block."""
    network = pool.network
    block_size = pool.spec.block_size
    count = 1 << (block_size - network.prefixlen)
    step = 1 << (network.max_prefixlen - block_size)
    seed = fnv1_32(hostname.encode()) if block_size < network.max_prefixlen else time.time_ns()
    start = _mix64(seed) % count
    base = int(network.network_address)
    network_type = type(network)
    for i in range(count):
        yield network_type((base + ((start + i) % count) * step, block_size))


def block_cap(config_limit: int, request_limit: int) -> int:
    """The stricter non-zero limit; Calico's implicit 20 when neither is set."""
    limits = [limit for limit in (config_limit, request_limit) if limit > 0]
    return min(limits) if limits else DEFAULT_MAX_BLOCKS_PER_HOST


@dataclass
class AutoAssignRequest:
    """What calico-ipam ADD asks for (Calico's AutoAssignArgs)."""

    handle_id: str
    hostname: str
    attrs: dict[str, str]  # node, pod, namespace, timestamp
    num_v4: int = 1
    num_v6: int = 0
    ipv4_pools: list[str] = field(default_factory=list)  # CIDRs or pool names
    ipv6_pools: list[str] = field(default_factory=list)
    namespace_labels: dict[str, str] | None = None
    intended_use: str = "Workload"
    max_blocks_per_host: int = 0


@dataclass
class AssignResult:
    """One family's outcome; fewer IPs than requested is not an error."""

    ips: list[IPInterface]  # with the block's mask, e.g. 10.0.0.5/26
    msgs: list[str]
    requested: int

    def shortfall_message(self, family: int) -> str:
        return (
            f"Assigned {len(self.ips)} out of {self.requested} requested IPv{family} addresses; "
            + "; ".join(self.msgs)
        )


@dataclass
class _ClaimState:
    """Affine blocks not yet tried, and how many blocks the host owns (for the cap)."""

    remaining: list[IPNetwork]
    owned: int


class IPAM:
    def __init__(self, store: Datastore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    # ----------------------------------------------------------------- reads

    def config(self) -> IPAMConfig:
        try:
            return self.store.get(IPAMConfigKey()).value
        except NotFound:
            return IPAMConfig()

    def pools(self) -> list[IPPool]:
        return [kvp.value for kvp in self.store.list(ResourceListOptions("IPPool"))]

    def _reservations(self, version: int) -> Reservations:
        networks = []
        for kvp in self.store.list(ResourceListOptions("IPReservation")):
            reservation: IPReservation = kvp.value
            for cidr in reservation.reserved_cidrs:
                network = ipaddress.ip_network(cidr, strict=False)
                if network.version == version:
                    networks.append(network)
        return Reservations(tuple(networks))

    def _node_labels(self, hostname: str) -> dict[str, str]:
        try:
            node: Node = self.store.get(ResourceKey("Node", hostname)).value
        except NotFound:
            raise IPAMError(f"resource does not exist: Node({hostname})") from None
        return node.metadata.labels

    def ensure_node(self, hostname: str, labels: dict[str, str] | None = None) -> None:
        """Create the Calico Node IPAM insists on (the local datastore has no calico-node)."""
        key = ResourceKey("Node", hostname)

        def attempt() -> None:
            try:
                kvp = self.store.get(key)
            except NotFound:
                self.store.create(KVPair(key, Node(ObjectMeta(hostname, dict(labels or {})))))
                return
            if labels is not None and kvp.value.metadata.labels != labels:
                kvp.value.metadata.labels = dict(labels)
                self.store.update(kvp)

        _with_retries(attempt)

    # ------------------------------------------------------------ pool choice

    @staticmethod
    def _selects(pool: IPPool, selector: str, labels: dict[str, str]) -> bool:
        try:
            return selector_matches(selector, labels)
        except SelectorError as err:
            raise IPAMRequestError(f"IP pool {pool.name} has an invalid selector: {err}") from err

    def _selects_node(self, pool: IPPool, node_labels: dict[str, str]) -> bool:
        return self._selects(pool, pool.spec.node_selector, node_labels)

    @staticmethod
    def _requested_pool(wanted: str, enabled: list[IPPool]) -> IPPool:
        try:
            network = ipaddress.ip_network(wanted, strict=False)
        except ValueError:
            network = None
        for pool in enabled:
            if pool.name == wanted or pool.network == network:
                return pool
        raise IPAMRequestError(f"the given pool ({wanted}) does not exist, or is not enabled")

    def _determine_pools(
        self,
        all_pools: list[IPPool],
        version: int,
        requested: list[str],
        req: AutoAssignRequest,
        node_labels: dict[str, str],
    ) -> list[IPPool]:
        enabled = [
            p
            for p in all_pools
            if p.network.version == version
            and p.is_enabled()
            and p.spec.block_size <= p.network.max_prefixlen
        ]
        if requested:
            chosen = [self._requested_pool(wanted, enabled) for wanted in requested]
        else:
            chosen = [
                p
                for p in enabled
                if p.spec.assignment_mode == "Automatic"
                and self._selects_node(p, node_labels)
                and (
                    req.namespace_labels is None
                    or self._selects(p, p.spec.namespace_selector, req.namespace_labels)
                )
            ]
        if not chosen:
            raise IPAMError(f"no configured Calico pools for node {req.hostname}")
        usable = [p for p in chosen if req.intended_use in p.spec.allowed_uses]
        if not usable:
            raise IPAMError(
                "cannot find a qualified ippool, no pools match the required use "
                f"({req.intended_use})"
            )
        return usable

    def _affine_blocks(
        self,
        hostname: str,
        version: int,
        pools: list[IPPool],
        all_pools: list[IPPool],
        node_labels: dict[str, str],
    ) -> list[IPNetwork]:
        """This host's blocks in `pools` (pool order). Empty affine blocks whose pool is
        gone or no longer selects the node are released on the way."""
        cidrs = [
            kvp.key.cidr for kvp in self.store.list(BlockAffinityListOptions(hostname, version))
        ]
        in_pools = [c for p in pools for c in cidrs if c.subnet_of(p.network)]
        for cidr in cidrs:
            if cidr in in_pools:
                continue
            pool = self._pool_containing(cidr, [p for p in all_pools if p.is_enabled()])
            if pool is None or not self._selects_node(pool, node_labels):
                self._release_affinity(hostname, cidr)
        return in_pools

    @staticmethod
    def _pool_containing(cidr: IPNetwork, pools: list[IPPool]) -> IPPool | None:
        return next(
            (p for p in pools if p.network.version == cidr.version and cidr.subnet_of(p.network)),
            None,
        )

    # ------------------------------------------------------------ auto-assign

    def auto_assign(self, req: AutoAssignRequest) -> tuple[AssignResult, AssignResult]:
        """Assign IPv4 then IPv6 addresses. A shortfall is reported in the results, not
        raised (as in Calico); on IPAMError nothing taken by this call is kept."""
        if not req.intended_use:
            raise IPAMError("must specify the intended use when assigning an IP")
        handle_id = sanitize_handle_id(req.handle_id)
        v4 = self._auto_assign_family(req, handle_id, 4, req.num_v4, req.ipv4_pools)
        try:
            v6 = self._auto_assign_family(req, handle_id, 6, req.num_v6, req.ipv6_pools)
        except IPAMError:
            self.release_ips([str(i.ip) for i in v4.ips])
            raise
        return v4, v6

    def _auto_assign_family(
        self, req: AutoAssignRequest, handle_id: str, version: int, num: int, requested: list[str]
    ) -> AssignResult:
        if num <= 0:
            return AssignResult([], [], 0)
        ips: list[IPInterface] = []
        try:
            msgs = self._assign_into(ips, req, handle_id, version, num, requested)
        except IPAMError:
            self.release_ips([str(i.ip) for i in ips])
            raise
        return AssignResult(ips, msgs, num)

    def _assign_into(
        self,
        ips: list[IPInterface],
        req: AutoAssignRequest,
        handle_id: str,
        version: int,
        num: int,
        requested: list[str],
    ) -> list[str]:
        """Calico's autoAssign: affine blocks, then new claims, then borrowing. Appends to
        `ips` as it goes so the caller can undo a failure; returns shortfall messages."""
        host = req.hostname
        config = self.config()
        reserved = self._reservations(version)
        node_labels = self._node_labels(host)
        all_pools = self.pools()
        pools = self._determine_pools(all_pools, version, requested, req, node_labels)
        affine = self._affine_blocks(host, version, pools, all_pools, node_labels)
        state = _ClaimState(affine, len(affine))
        cap = block_cap(config.max_blocks_per_host, req.max_blocks_per_host)

        for _ in range(RETRIES + num):
            if len(ips) >= num:
                break
            try:
                kvp = self._find_or_claim_block(host, pools, state, cap, config, reserved)
            except _NoFreeBlocks:
                break
            ips += self._assign_from_block(
                kvp, num - len(ips), handle_id, req.attrs, host, config.strict_affinity, reserved
            )
        if len(ips) >= num:
            return []
        if config.strict_affinity:
            return ["No more free affine blocks and strict affinity enabled"]
        ips += self._borrow(num - len(ips), handle_id, req.attrs, host, pools, reserved)
        if len(ips) >= num:
            return []
        return [f"No IPs available in pools: {_go_list([p.spec.cidr for p in pools])}"]

    def _find_or_claim_block(
        self,
        host: str,
        pools: list[IPPool],
        state: _ClaimState,
        cap: int,
        config: IPAMConfig,
        reserved: Reservations,
    ) -> KVPair:
        """A block affine to `host` with a free address: an existing one, else a new claim."""
        while state.remaining:
            cidr = state.remaining.pop(0)
            if reserved.covers(cidr):
                continue
            kvp = self._block_from_affinity(host, cidr)
            if kvp is not None and kvp.value.free_ordinals(reserved):
                return kvp
        if state.owned >= cap:
            raise IPAMError(BLOCK_LIMIT_MESSAGE)
        if not config.auto_allocate_blocks:
            raise _NoFreeBlocks("failed to find or claim a block")

        def attempt() -> tuple[KVPair, bool]:
            cidr = self._find_usable_block(host, pools, reserved)
            return self._claim_block(host, cidr)

        kvp, newly_claimed = _with_retries(attempt)
        state.owned += int(newly_claimed)
        return kvp

    def _block_from_affinity(self, host: str, cidr: IPNetwork) -> KVPair | None:
        """The block behind one of our affinities, confirming a half-done claim, recreating
        a block lost in a crash, and dropping the affinity if the block is someone else's."""

        def attempt() -> KVPair | None:
            try:
                affinity = self.store.get(BlockAffinityKey(host, cidr))
            except NotFound:
                return None
            try:
                block = self.store.get(BlockKey(cidr))
            except NotFound:
                return self._claim_block(host, cidr)[0]
            if block.value.affinity != host_affinity(host):
                self._delete_if_present(affinity)
                return None
            if not affinity.value.is_confirmed():
                affinity = self._set_affinity_state(affinity, STATE_PENDING)
                block.value.sequence_number += 1
                block = self.store.update(block)
                self._set_affinity_state(affinity, STATE_CONFIRMED)
            return block

        return _with_retries(attempt)

    def _blocks_by_cidr(self, pools: list[IPPool]) -> dict[IPNetwork, KVPair]:
        """Every block of the pools' IP version, in one datastore read."""
        version = pools[0].network.version
        return {kvp.key.cidr: kvp for kvp in self.store.list(BlockListOptions(version))}

    def _find_usable_block(
        self, host: str, pools: list[IPPool], reserved: Reservations
    ) -> IPNetwork:
        """First CIDR (hostname-seeded walk of each pool) with no block yet or with our
        free block; failing that, reclaim another host's long-empty block."""
        blocks = self._blocks_by_cidr(pools)
        ours = host_affinity(host)
        reclaimable: list[KVPair] = []
        for pool in pools:
            for cidr in block_cidrs(pool, host):
                if reserved.covers(cidr):
                    continue
                kvp = blocks.get(cidr)
                if kvp is None:
                    return cidr
                block: AllocationBlock = kvp.value
                if block.affinity == ours and block.free_ordinals(reserved):
                    return cidr
                if block.affinity and block.affinity.startswith("host:") and block.is_empty():
                    reclaimable.append(kvp)
        now = self._clock()
        for kvp in reclaimable:
            claimed_at = kvp.value.affinity_claim_time
            old_enough = not claimed_at or (
                now - _parse_rfc3339(claimed_at) >= EMPTY_BLOCK_MIN_RECLAIM_AGE
            )
            other_host = kvp.value.affinity.removeprefix("host:")
            if old_enough and self._release_affinity(other_host, kvp.key.cidr):
                return kvp.key.cidr
        raise _NoFreeBlocks("No Free Blocks")

    def _claim_block(self, host: str, cidr: IPNetwork) -> tuple[KVPair, bool]:
        """Pending affinity, then the block, then confirm: a crash in between leaves a
        pending affinity that the next reader finishes or cleans up. Returns the block and
        whether this call created it; raises _ClaimConflict if another host owns it."""
        affinity_key = BlockAffinityKey(host, cidr)
        try:
            affinity = self.store.create(KVPair(affinity_key, BlockAffinity(STATE_PENDING)))
        except AlreadyExists:
            affinity = self.store.get(affinity_key)
            if not affinity.value.is_confirmed():
                affinity = self._set_affinity_state(affinity, STATE_PENDING)
        now = self._clock()
        block = AllocationBlock.new(cidr, host_affinity(host), _rfc3339(now), time.time_ns())
        try:
            created = self.store.create(KVPair(BlockKey(cidr), block))
        except AlreadyExists:
            existing = self.store.get(BlockKey(cidr))
            if existing.value.affinity == host_affinity(host):
                self._set_affinity_state(affinity, STATE_CONFIRMED)
                return existing, False
            self._delete_if_present(affinity)
            raise _ClaimConflict(str(cidr)) from None
        self._set_affinity_state(affinity, STATE_CONFIRMED)
        return created, True

    def _set_affinity_state(self, affinity: KVPair, state: str) -> KVPair:
        if affinity.value.state == state:
            return affinity
        affinity.value.state = state
        return self.store.update(affinity)

    def _delete_if_present(self, kvp: KVPair) -> None:
        with contextlib.suppress(NotFound):
            self.store.delete(kvp)

    def _release_affinity(self, host: str, cidr: IPNetwork) -> bool:
        """Give up `host`'s affinity for an empty block (pendingDeletion, delete the block
        under CAS, delete the affinity). False if the block is in use."""

        def attempt() -> bool:
            try:
                affinity = self.store.get(BlockAffinityKey(host, cidr))
            except NotFound:
                return False
            try:
                block = self.store.get(BlockKey(cidr))
            except NotFound:
                self._delete_if_present(affinity)
                return True
            if block.value.affinity == host_affinity(host):
                if not block.value.is_empty():
                    return False
                affinity = self._set_affinity_state(affinity, STATE_PENDING_DELETION)
                try:
                    self.store.delete(block)
                except Conflict:
                    self._set_affinity_state(affinity, STATE_CONFIRMED)
                    raise
            self._delete_if_present(affinity)
            return True

        return _with_retries(attempt)

    def release_host_affinities(self, host: str) -> list[IPNetwork]:
        """Give up every empty block affine to `host` (a node that left the cluster);
        blocks still holding addresses keep their affinity. Returns the CIDRs given up."""
        cidrs = [kvp.key.cidr for kvp in self.store.list(BlockAffinityListOptions(host))]
        return [cidr for cidr in cidrs if self._release_affinity(host, cidr)]

    def _assign_from_block(
        self,
        kvp: KVPair,
        num: int,
        handle_id: str,
        attrs: dict[str, str],
        host: str,
        affinity_check: bool,
        reserved: Reservations,
    ) -> list[IPInterface]:
        """Take up to `num` ordinals: handle first, then the block under CAS (undoing the
        handle if the block write loses), so a handle never under-counts its IPs."""
        for _ in range(RETRIES):
            block: AllocationBlock = kvp.value
            if affinity_check and block.affinity != host_affinity(host):
                return []
            ordinals = block.auto_assign(num, handle_id, attrs, reserved)
            if not ordinals:
                return []
            self._change_handle(handle_id, str(block.cidr), _add(len(ordinals)))
            block.sequence_number += 1
            try:
                self.store.update(kvp)
                return [block.interface(o) for o in ordinals]
            except (Conflict, NotFound):
                self._change_handle(handle_id, str(block.cidr), _add(-len(ordinals)))
            try:
                kvp = self.store.get(kvp.key)
            except NotFound:
                return []
        raise IPAMRetriesExhausted(MAX_RETRIES_MESSAGE)

    def _borrow(
        self,
        num: int,
        handle_id: str,
        attrs: dict[str, str],
        host: str,
        pools: list[IPPool],
        reserved: Reservations,
    ) -> list[IPInterface]:
        """Non-strict affinity's last resort: free addresses in any existing block. One
        list instead of Calico's GET per candidate; the block CAS catches staleness."""
        blocks = self._blocks_by_cidr(pools)
        ips: list[IPInterface] = []
        for pool in pools:
            for cidr in block_cidrs(pool, host):
                if len(ips) >= num:
                    return ips
                kvp = blocks.get(cidr)
                if kvp is None or reserved.covers(cidr):
                    continue
                ips += self._assign_from_block(
                    kvp, num - len(ips), handle_id, attrs, host, False, reserved
                )
        return ips

    # ----------------------------------------------------------- specific IP

    def assign_ip(
        self,
        ip: str,
        handle_id: str,
        attrs: dict[str, str],
        hostname: str,
        intended_use: str = "Workload",
    ) -> IPInterface:
        """Assign one given address (CNI_ARGS IP=, pod annotations); the result carries
        the block mask. Reservations are not consulted, as in Calico."""
        handle_id = sanitize_handle_id(handle_id)
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise IPAMRequestError(f"invalid IP address: {ip}") from None
        pool = next((p for p in self.pools() if p.is_enabled() and address in p.network), None)
        if pool is None:
            raise IPAMRequestError(NOT_IN_POOL_MESSAGE)
        if intended_use and intended_use not in pool.spec.allowed_uses:
            raise IPAMError(
                f'IP address {address} is in IP pool "{pool.name}", which is not allowed for '
                f'use "{intended_use}" (allowedUses: {_go_list(pool.spec.allowed_uses)})'
            )
        cidr = ipaddress.ip_network((address, pool.spec.block_size), strict=False)
        strict = self.config().strict_affinity
        for _ in range(RETRIES):
            try:
                kvp = self.store.get(BlockKey(cidr))
            except NotFound:
                with contextlib.suppress(*_RETRYABLE):
                    self._claim_block(hostname, cidr)
                continue
            block: AllocationBlock = kvp.value
            if strict and block.affinity and block.affinity != host_affinity(hostname):
                raise IPAMError(
                    f"Block affinity ({block.affinity}) does not match provided "
                    f"({host_affinity(hostname)})"
                )
            ordinal = block.ordinal(address)
            try:
                block.assign(ordinal, handle_id, attrs)
            except AddressInUse as err:
                raise IPAMError(str(err)) from None
            self._change_handle(handle_id, str(cidr), _add(1))
            block.sequence_number += 1
            try:
                self.store.update(kvp)
            except (Conflict, NotFound):
                self._change_handle(handle_id, str(cidr), _add(-1))
                continue
            return block.interface(ordinal)
        raise IPAMRetriesExhausted(MAX_RETRIES_MESSAGE)

    # --------------------------------------------------------------- handles

    def _change_handle(self, handle_id: str, block: str, new_count: Callable[[int], int]) -> None:
        """CAS-update one block's count in a handle; create it / delete it when empty."""
        key = HandleKey(handle_id)

        def attempt() -> None:
            try:
                kvp = self.store.get(key)
            except NotFound:
                count = new_count(0)
                if count > 0:
                    self.store.create(KVPair(key, IPAMHandle({block: count})))
                return
            counts = kvp.value.block
            count = new_count(counts.get(block, 0))
            if count > 0:
                counts[block] = count
            else:
                counts.pop(block, None)
            if counts:
                self.store.update(kvp)
            else:
                self.store.delete(kvp)

        _with_retries(attempt)

    def list_handles(self) -> list[str]:
        """Stored handle IDs, unsanitised so that they can be passed to release_by_handle."""
        return [kvp.key.handle_id for kvp in self.store.list(HandleListOptions())]

    def _handle_blocks(self, handle_id: str) -> list[str]:
        return list(self.store.get(HandleKey(handle_id)).value.block)  # NotFound propagates

    def _blocks_of_handle(self, handle_id: str) -> Iterator[AllocationBlock]:
        for cidr in self._handle_blocks(handle_id):
            try:
                yield self.store.get(BlockKey(ipaddress.ip_network(cidr))).value
            except NotFound:
                continue

    def ips_by_handle(self, handle_id: str) -> list[IPAddress]:
        return [
            block.ip(o)
            for block in self._blocks_of_handle(handle_id)
            for o in block.ordinals_for_handle(handle_id)
        ]

    def attrs_for_handle(self, handle_id: str) -> dict[str, str]:
        """The allocation attributes (node, pod, namespace, ...) of a handle's first IP,
        which is what GC needs to tell whose handle it is; {} if it owns no IP."""
        for block in self._blocks_of_handle(handle_id):
            ordinals = block.ordinals_for_handle(handle_id)
            if ordinals:
                return dict(block.attributes[block.allocations[ordinals[0]]].secondary)
        return {}

    # --------------------------------------------------------------- release

    def release_by_handle(self, handle_id: str) -> list[IPAddress]:
        """Free every IP of the handle and delete it; raises NotFound for no handle."""
        released: list[IPAddress] = []
        for cidr in self._handle_blocks(handle_id):
            block_cidr = ipaddress.ip_network(cidr)
            freed, by_handle = self._release_from_block(
                block_cidr, lambda block: block.ordinals_for_handle(handle_id)
            )
            released += freed
            by_handle.pop(handle_id, None)
            self._change_handle(handle_id, cidr, lambda count: 0)
            self._decrement_handles(by_handle, block_cidr)
        return released

    def release_ips(self, ips: list[str]) -> list[str]:
        """Free the given addresses; returns those that were not allocated."""
        addresses = {}
        for text in ips:
            try:
                addresses[text] = ipaddress.ip_address(text)
            except ValueError:
                raise IPAMRequestError(f"invalid IP address: {text}") from None
        by_block: dict[IPNetwork, list[str]] = {}
        unallocated: list[str] = []
        pools = self.pools()
        block_index: list[IPNetwork] | None = None
        for text, address in addresses.items():
            pool = next((p for p in pools if address in p.network), None)
            if pool is not None:
                cidr = ipaddress.ip_network((address, pool.spec.block_size), strict=False)
            else:
                if block_index is None:
                    block_index = [kvp.key.cidr for kvp in self.store.list(BlockListOptions())]
                cidr = next((c for c in block_index if address in c), None)
            if cidr is None:
                unallocated.append(text)
            else:
                by_block.setdefault(cidr, []).append(text)
        for cidr, texts in by_block.items():
            wanted = {addresses[t] for t in texts}
            freed, by_handle = self._release_from_block(
                cidr,
                lambda block, wanted=wanted: [
                    o for o in block.allocated_ordinals() if block.ip(o) in wanted
                ],
            )
            self._decrement_handles(by_handle, cidr)
            freed_set = set(freed)
            unallocated += [t for t in texts if addresses[t] not in freed_set]
        return [text for text in addresses if text in unallocated]

    def _release_from_block(
        self, cidr: IPNetwork, pick: Callable[[AllocationBlock], list[int]]
    ) -> tuple[list[IPAddress], Counter[str]]:
        """Release the picked ordinals under CAS; return them and the count per handle.
        An empty block without affinity is deleted; one with affinity is kept."""

        def attempt() -> tuple[list[IPAddress], Counter[str], AllocationBlock | None]:
            try:
                kvp = self.store.get(BlockKey(cidr))
            except NotFound:
                return [], Counter(), None
            block: AllocationBlock = kvp.value
            ordinals = pick(block)
            if not ordinals:
                return [], Counter(), None
            handles = Counter(block.handle_of(o) or "" for o in ordinals)
            block.release(ordinals)
            if block.is_empty() and block.affinity is None:
                self.store.delete(kvp)
            else:
                block.sequence_number += 1
                self.store.update(kvp)
            return [block.ip(o) for o in ordinals], handles, block

        freed, handles, block = _with_retries(attempt)
        if block is not None and block.affinity and block.is_empty():
            self._ensure_consistent_affinity(block)
        handles.pop("", None)
        return freed, handles

    def _decrement_handles(self, by_handle: Counter[str], cidr: IPNetwork) -> None:
        for handle_id, released in by_handle.items():
            self._change_handle(handle_id, str(cidr), _add(-released))

    def _ensure_consistent_affinity(self, block: AllocationBlock) -> None:
        """An emptied block whose pool no longer selects its host loses its affinity."""
        if block.affinity is None or not block.affinity.startswith("host:"):
            return
        host = block.affinity.removeprefix("host:")
        pool = self._pool_containing(block.cidr, [p for p in self.pools() if p.is_enabled()])
        try:
            labels = self._node_labels(host)
        except IPAMError:
            labels = None
        if pool is None or labels is None or not self._selects_node(pool, labels):
            self._release_affinity(host, block.cidr)
