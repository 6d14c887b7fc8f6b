"""Calico's IPAM algorithm (libcalico-go `lib/ipam`) over the Datastore interface.

Pure: no netlink, no CNI, no root. Every datastore write is a compare-and-swap; a lost
race re-reads and retries (at most `RETRIES` times), exactly as Calico does, so many
processes and nodes can allocate from one datastore without handing out an IP twice.

Where Calico reads every affine block (two reads each) until one has room, so that an
ADD on a node with 313 blocks costs ~630 etcd round trips, this engine keeps the same
data and the same choices at a cost that does not grow with the blocks:
- `BlockHints` remember each affine block's free addresses and revision. An ADD reads
  the first hinted block with room together with the IPAM config, pools, reservations
  and Node in one batched read; the block is used only if it really has room, and is
  written under CAS as always, so a wrong hint costs a read, never an address.
- The host's affinities are listed (and blocks of pools that no longer select the node
  released, as Calico does on every ADD) only when the pools or the Node's labels
  changed since the last listing, or when no hinted block has room.
- Before claiming a new block, blocks believed full are checked by revision alone
  (`Datastore.revisions`), so space freed behind the hints' back (another node's
  `ipam release`, real Calico on the node) is found and used first.
- A new block is found by checking the hostname-seeded walk of candidate CIDRs for
  existence in batches, not by reading every block of the pool; only a pool with no
  CIDR left falls back to Calico's full read (to reclaim other hosts' empty blocks).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from libcalico.datastore.base import (
    AlreadyExists,
    Conflict,
    Datastore,
    KVPair,
    NotFound,
    Read,
)
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
    Key,
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
    """The claim lost a race (another host owns the block, or another claimer for this
    host gave the pending affinity up meanwhile): choose again."""


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


def _reservations_of(kvps: list[KVPair], version: int) -> Reservations:
    networks = []
    for kvp in kvps:
        reservation: IPReservation = kvp.value
        for cidr in reservation.reserved_cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            if network.version == version:
                networks.append(network)
    return Reservations(tuple(networks))


def _labels_of(node: KVPair | None, hostname: str) -> dict[str, str]:
    """The Node's labels; IPAM refuses a node that does not exist, as Calico does."""
    if node is None:
        raise IPAMError(f"resource does not exist: Node({hostname})")
    value: Node = node.value
    return value.metadata.labels


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
class HostHints:
    """One host's blocks of one IP version as last seen: CIDR → (revision, free
    addresses), and the pools' revisions and Node's labels when its affinities were last
    listed."""

    blocks: dict[str, tuple[str, int]] = field(default_factory=dict)
    selection: str = ""
    reserved: str = ""  # the reservations the free counts exclude


class BlockHints:
    """What the engine remembers of affine blocks between calls. Never trusted: a block is
    read before it is used and written under CAS. A long-lived engine keeps its own; the
    CNI plugin keeps one per node in a file beside the IPAM lock (ipam_plugin/main.py), so
    standalone calls and the node agent share it."""

    MAX_HOSTS = 16

    def __init__(self, scope: str = "") -> None:
        self.scope = scope  # which datastore the revisions belong to
        self.changed = False
        self._hosts: dict[tuple[str, int], HostHints] = {}

    def of(self, host: str, version: int) -> HostHints:
        hints = self._hosts.pop((host, version), None) or HostHints()
        self._hosts[host, version] = hints  # most recently used last
        while len(self._hosts) > self.MAX_HOSTS:
            del self._hosts[next(iter(self._hosts))]
        return hints

    def note(self, host: str, cidr: IPNetwork, revision: str | None, free: int) -> None:
        blocks = self.of(host, cidr.version).blocks
        entry = (str(revision), free)
        if blocks.get(str(cidr)) != entry:
            blocks[str(cidr)] = entry
            self.changed = True

    def forget(self, host: str, cidr: IPNetwork) -> None:
        if self.of(host, cidr.version).blocks.pop(str(cidr), None) is not None:
            self.changed = True

    def listed(self, host: str, version: int, cidrs: Iterable[IPNetwork], selection: str) -> None:
        """The host's affinities were just listed under `selection`: drop other blocks."""
        hints = self.of(host, version)
        keep = {str(c) for c in cidrs}
        blocks = {c: entry for c, entry in hints.blocks.items() if c in keep}
        if blocks != hints.blocks or hints.selection != selection:
            hints.blocks, hints.selection = blocks, selection
            self.changed = True

    def reserved(self, host: str, version: int, mark: str) -> None:
        """Free counts exclude reservations: when those change, start again."""
        hints = self.of(host, version)
        if hints.reserved != mark:
            hints.blocks, hints.reserved = {}, mark
            self.changed = True

    def to_json(self) -> dict[str, Any]:
        hosts: dict[str, dict[str, Any]] = {}
        for (host, version), hints in self._hosts.items():
            hosts.setdefault(host, {})[str(version)] = {
                "selection": hints.selection,
                "reserved": hints.reserved,
                "blocks": {c: list(entry) for c, entry in hints.blocks.items()},
            }
        return {"scope": self.scope, "hosts": hosts}

    @classmethod
    def from_json(cls, doc: Any, scope: str) -> BlockHints:
        """Hints stored for `scope`; anything else (another datastore, a damaged or
        foreign file) gives empty hints, which only cost reads."""
        hints = cls(scope)
        try:
            if doc.get("scope") != scope:
                return hints
            for host, versions in doc["hosts"].items():
                for version, stored in versions.items():
                    blocks = {
                        str(ipaddress.ip_network(c)): (str(rev), int(free))
                        for c, (rev, free) in stored["blocks"].items()
                    }
                    hints._hosts[str(host), int(version)] = HostHints(
                        blocks, str(stored["selection"]), str(stored["reserved"])
                    )
        except (AttributeError, KeyError, TypeError, ValueError):
            return cls(scope)
        return hints


def _affinity_order(cidr: IPNetwork) -> str:
    """Where a block's affinity sorts in a host's list (etcd key order)."""
    return str(cidr).replace("/", "-")


def _hinted_with_room(hints: HostHints) -> list[IPNetwork]:
    """Blocks last seen with a free address, in affinity order."""
    cidrs = [ipaddress.ip_network(c) for c, (_, free) in hints.blocks.items() if free > 0]
    return sorted(cidrs, key=_affinity_order)


def _reservations_mark(reserved: Reservations) -> str:
    """The reservations a hint's free count was computed against."""
    return ",".join(sorted(str(n) for n in reserved.networks))


@dataclass
class _Context:
    """What every auto-assign reads first, in one batched read."""

    config: IPAMConfig
    reserved: Reservations
    node_labels: dict[str, str]
    all_pools: list[IPPool]
    selection: str  # pools' revisions and Node labels: what the affinities' pool check saw
    prefetched: dict[IPNetwork, tuple[KVPair | None, KVPair | None]]  # affinity, block


@dataclass
class _ClaimState:
    """The host's affine blocks in the request's pools: which are left to try (each at
    most once per request), and how many the host owns (for the cap) once listed."""

    host: str
    version: int
    pools: list[IPPool]
    reserved: Reservations
    hints: HostHints
    prefetched: dict[IPNetwork, tuple[KVPair | None, KVPair | None]]
    listed: list[KVPair] | None = None  # the affinities, once listed
    owned: int = 0
    tried: set[IPNetwork] = field(default_factory=set)

    def pool_rank(self, cidr: IPNetwork) -> int | None:
        return next(
            (
                i
                for i, p in enumerate(self.pools)
                if cidr.version == p.network.version and cidr.subnet_of(p.network)
            ),
            None,
        )

    def untried(self, cidrs: Iterable[IPNetwork]) -> list[IPNetwork]:
        """Not tried yet, in a request pool, not wholly reserved: pool order, then key order."""
        ranked = []
        for cidr in cidrs:
            rank = self.pool_rank(cidr)
            if cidr not in self.tried and rank is not None and not self.reserved.covers(cidr):
                ranked.append((rank, _affinity_order(cidr), cidr))
        return [cidr for _, _, cidr in sorted(ranked)]


# A handle this engine has not read (None: read, and found missing).
_UNREAD = object()
# Candidate CIDRs checked for existence per round trip when claiming: few first (the
# first is usually free), up to etcd's transaction limit.
_CLAIM_BATCHES = (8, 32, 128)
# Affine blocks read per batch when their free space is not known.
_READ_BATCH = 128


class IPAM:
    def __init__(
        self,
        store: Datastore,
        *,
        clock: Callable[[], float] = time.time,
        hints: BlockHints | None = None,
    ) -> None:
        self.store = store
        self._clock = clock
        self.hints = BlockHints() if hints is None else hints
        self._handles: dict[str, Any] = {}  # handle ID → its KVPair as last written, or None

    # ----------------------------------------------------------------- reads

    def config(self) -> IPAMConfig:
        try:
            return self.store.get(IPAMConfigKey()).value
        except NotFound:
            return IPAMConfig()

    def pools(self) -> list[IPPool]:
        return [kvp.value for kvp in self.store.list(ResourceListOptions("IPPool"))]

    def _node_labels(self, hostname: str) -> dict[str, str]:
        try:
            node = self.store.get(ResourceKey("Node", hostname))
        except NotFound:
            node = None
        return _labels_of(node, hostname)

    def _read_context(self, host: str, version: int, candidates: list[IPNetwork]) -> _Context:
        """Config, reservations, Node, pools, and the hinted blocks with their affinities,
        in one read of the datastore (one round trip on etcd)."""
        reads: list[Read] = [
            IPAMConfigKey(),
            ResourceListOptions("IPReservation"),
            ResourceKey("Node", host),
            ResourceListOptions("IPPool"),
        ]
        for cidr in candidates:
            reads += [BlockAffinityKey(host, cidr), BlockKey(cidr)]
        config, reservations, node, pools, *blocks = self.store.read_many(reads)
        assert isinstance(reservations, list) and isinstance(pools, list)
        assert not isinstance(node, list)
        labels = _labels_of(node, host)
        # What decides which pools select the node: the pools as stored, the node's labels
        # (not its revision: a Kubernetes Node's status changes it every few seconds).
        selection = " ".join(f"{kvp.value.name}@{kvp.revision}" for kvp in pools)
        selection += " " + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        prefetched = {cidr: (blocks[2 * i], blocks[2 * i + 1]) for i, cidr in enumerate(candidates)}
        return _Context(
            config=config.value if isinstance(config, KVPair) else IPAMConfig(),
            reserved=_reservations_of(reservations, version),
            node_labels=labels,
            all_pools=[kvp.value for kvp in pools],
            selection=selection,
            prefetched=prefetched,  # type: ignore[arg-type]
        )

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

    def _list_affinities(self, state: _ClaimState, ctx: _Context) -> dict[IPNetwork, KVPair]:
        """The host's affinities in the request's pools, listed once per request. Empty
        affine blocks whose pool is gone or no longer selects the node are released on the
        way, as Calico does on every ADD; here on every listing, which happens whenever
        the pools or the Node changed since the last one."""
        if state.listed is not None:
            return {kvp.key.cidr: kvp for kvp in state.listed}
        enabled = [p for p in ctx.all_pools if p.is_enabled()]
        kept = []
        for kvp in self.store.list(BlockAffinityListOptions(state.host, state.version)):
            cidr = kvp.key.cidr
            if (
                state.pool_rank(cidr) is None
                and not self._selected(cidr, enabled, ctx.node_labels)
                and self._release_affinity(state.host, cidr)
            ):
                continue
            kept.append(kvp)
        self.hints.listed(state.host, state.version, [k.key.cidr for k in kept], ctx.selection)
        state.listed = [kvp for kvp in kept if state.pool_rank(kvp.key.cidr) is not None]
        state.owned = len(state.listed)
        return {kvp.key.cidr: kvp for kvp in state.listed}

    def _selected(self, cidr: IPNetwork, pools: list[IPPool], node_labels: dict[str, str]) -> bool:
        """Whether one of `pools` contains the block and selects the node."""
        pool = self._pool_containing(cidr, pools)
        return pool is not None and self._selects_node(pool, node_labels)

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
        hints = self.hints.of(host, version)
        ctx = self._read_context(host, version, _hinted_with_room(hints)[:1])
        config, reserved = ctx.config, ctx.reserved
        pools = self._determine_pools(ctx.all_pools, version, requested, req, ctx.node_labels)
        self.hints.reserved(host, version, _reservations_mark(reserved))
        state = _ClaimState(host, version, pools, reserved, hints, ctx.prefetched)
        if hints.selection != ctx.selection:
            self._list_affinities(state, ctx)
        cap = block_cap(config.max_blocks_per_host, req.max_blocks_per_host)

        for _ in range(RETRIES + num):
            if len(ips) >= num:
                break
            try:
                kvp = self._find_or_claim_block(state, ctx, cap)
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

    def _find_or_claim_block(self, state: _ClaimState, ctx: _Context, cap: int) -> KVPair:
        """A block affine to the host with a free address: an existing one, else a new claim."""
        kvp = self._affine_block_with_room(state, ctx)
        if kvp is not None:
            return kvp
        if state.owned >= cap:
            raise IPAMError(BLOCK_LIMIT_MESSAGE)
        if not ctx.config.auto_allocate_blocks:
            raise _NoFreeBlocks("failed to find or claim a block")

        affine = {kvp.key.cidr for kvp in state.listed or ()}

        def attempt() -> tuple[KVPair, bool]:
            cidr = self._find_usable_block(state.host, state.pools, state.reserved, affine)
            return self._claim_block(state.host, cidr)

        kvp, newly_claimed = _with_retries(attempt)
        state.owned += int(newly_claimed)
        state.tried.add(kvp.key.cidr)
        self._note(kvp, state.reserved)
        return kvp

    def _affine_block_with_room(self, state: _ClaimState, ctx: _Context) -> KVPair | None:
        """Blocks the hints say have room first (one read each, the first already read
        with the context); then, from the listed affinities, blocks with no hint (read in
        batches), then blocks believed full whose revision changed."""
        kvp = self._hinted_block_with_room(state)
        if kvp is not None:
            return kvp
        listed = self._list_affinities(state, ctx)
        unknown = state.untried(c for c in listed if str(c) not in state.hints.blocks)
        kvp = self._first_with_room(state, listed, unknown)
        if kvp is not None:
            return kvp
        suspects = state.untried(listed)
        if not suspects:
            return None
        current = self.store.revisions([BlockKey(c) for c in suspects])
        changed = []
        for cidr in suspects:
            seen = state.hints.blocks.get(str(cidr))
            if seen is not None and current.get(BlockKey(cidr)) == seen[0]:
                state.tried.add(cidr)  # full when last seen, and unchanged since
            else:
                changed.append(cidr)
        return self._first_with_room(state, listed, changed)

    def _hinted_block_with_room(self, state: _ClaimState) -> KVPair | None:
        for cidr in state.untried(_hinted_with_room(state.hints)):
            state.tried.add(cidr)
            affinity, block = state.prefetched.pop(cidr, None) or self._read_pair(state.host, cidr)
            if affinity is None:
                self.hints.forget(state.host, cidr)
                continue
            kvp = self._usable_block(state, affinity, block)
            if kvp is not None:
                return kvp
        return None

    def _first_with_room(
        self, state: _ClaimState, listed: dict[IPNetwork, KVPair], cidrs: list[IPNetwork]
    ) -> KVPair | None:
        """The first of `cidrs` (affine blocks, in order) with room, reading them in
        batches; blocks read but not reached are kept for later and their hints noted."""
        for start in range(0, len(cidrs), _READ_BATCH):
            chunk = cidrs[start : start + _READ_BATCH]
            unread = [c for c in chunk if c not in state.prefetched]
            blocks = self.store.read_many([BlockKey(c) for c in unread])
            for cidr, block in zip(unread, blocks, strict=True):
                assert not isinstance(block, list)
                state.prefetched[cidr] = (listed[cidr], block)
                if block is not None and block.value.affinity == host_affinity(state.host):
                    self._note(block, state.reserved)
            for cidr in chunk:
                state.tried.add(cidr)
                affinity, block = state.prefetched.pop(cidr)
                kvp = self._usable_block(state, affinity, block) if affinity else None
                if kvp is not None:
                    return kvp
        return None

    def _read_pair(self, host: str, cidr: IPNetwork) -> tuple[KVPair | None, KVPair | None]:
        affinity, block = self.store.read_many([BlockAffinityKey(host, cidr), BlockKey(cidr)])
        assert not isinstance(affinity, list) and not isinstance(block, list)
        return affinity, block

    def _usable_block(
        self, state: _ClaimState, affinity: KVPair, block: KVPair | None
    ) -> KVPair | None:
        """The block behind one of our affinities if it has a free address; hints noted."""
        kvp = self._block_from_affinity(state.host, affinity, block)
        if kvp is None:
            self.hints.forget(state.host, affinity.key.cidr)
            return None
        self._note(kvp, state.reserved)
        return kvp if kvp.value.free_ordinals(state.reserved) else None

    def _note(self, kvp: KVPair, reserved: Reservations) -> None:
        """Remember a block as just read or written, for its host's next call."""
        block: AllocationBlock = kvp.value
        if block.affinity and block.affinity.startswith("host:"):
            host = block.affinity.removeprefix("host:")
            self.hints.note(host, block.cidr, kvp.revision, len(block.free_ordinals(reserved)))

    def _block_from_affinity(
        self, host: str, affinity: KVPair, block: KVPair | None
    ) -> KVPair | None:
        """The block behind one of our affinities (both as just read), confirming a
        half-done claim, recreating a block lost in a crash, and dropping the affinity if
        the block is someone else's; a lost race re-reads both."""
        cidr = affinity.key.cidr
        for _ in range(RETRIES):
            try:
                return self._settle_affinity(host, affinity, block)
            except _RETRYABLE:
                pair = self._read_pair(host, cidr)
                if pair[0] is None:
                    return None
                affinity, block = pair  # type: ignore[assignment]
        raise IPAMRetriesExhausted(MAX_RETRIES_MESSAGE)

    def _settle_affinity(self, host: str, affinity: KVPair, block: KVPair | None) -> KVPair | None:
        if block is None:
            return self._claim_block(host, affinity.key.cidr)[0]
        if block.value.affinity != host_affinity(host):
            self._delete_if_present(affinity)
            return None
        if not affinity.value.is_confirmed():
            affinity = self._set_affinity_state(affinity, STATE_PENDING)
            block.value.sequence_number += 1
            block = self.store.update(block)
            self._set_affinity_state(affinity, STATE_CONFIRMED)
        return block

    def _blocks_by_cidr(self, pools: list[IPPool]) -> dict[IPNetwork, KVPair]:
        """Every block of the pools' IP version, in one datastore read."""
        version = pools[0].network.version
        return {kvp.key.cidr: kvp for kvp in self.store.list(BlockListOptions(version))}

    def _unclaimed_cidr(
        self, pool: IPPool, host: str, reserved: Reservations, affine: set[IPNetwork]
    ) -> IPNetwork | None:
        """The first CIDR of the pool's hostname-seeded walk with no block, checking
        candidates for existence in growing batches instead of reading every block. The
        host's own blocks (`affine`), where its walk starts, are known to exist."""
        walk = (c for c in block_cidrs(pool, host) if c not in affine and not reserved.covers(c))
        for size in itertools.chain(_CLAIM_BATCHES, itertools.repeat(_CLAIM_BATCHES[-1])):
            chunk = list(itertools.islice(walk, size))
            if not chunk:
                return None
            present = self.store.revisions([BlockKey(c) for c in chunk])
            free = next((c for c in chunk if BlockKey(c) not in present), None)
            if free is not None:
                return free
        return None  # unreachable: the walk ends

    def _find_usable_block(
        self, host: str, pools: list[IPPool], reserved: Reservations, affine: set[IPNetwork]
    ) -> IPNetwork:
        """First CIDR (hostname-seeded walk of each pool) with no block yet. Only when
        every CIDR has one, Calico's full read: a block of ours with room that lost its
        affinity, else another host's long-empty block to reclaim."""
        for pool in pools:
            cidr = self._unclaimed_cidr(pool, host, reserved, affine)
            if cidr is not None:
                return cidr
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
            try:
                affinity = self.store.get(affinity_key)
                if not affinity.value.is_confirmed():
                    affinity = self._set_affinity_state(affinity, STATE_PENDING)
            except NotFound:  # its claimer, for this host too, gave it up meanwhile
                raise _ClaimConflict(str(cidr)) from None
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

    def _release_affinity(self, host: str, cidr: IPNetwork, must_be_empty: bool = True) -> bool:
        """Give up `host`'s affinity for a block: an empty one is deleted (pendingDeletion,
        delete the block under CAS, delete the affinity). One in use is kept (False), or,
        unless `must_be_empty`, kept without affinity until its last address goes."""

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
                    if must_be_empty:
                        return False
                    block.value.affinity = None
                    self.store.update(block)
                    self._delete_if_present(affinity)
                    return True
                affinity = self._set_affinity_state(affinity, STATE_PENDING_DELETION)
                try:
                    self.store.delete(block)
                except Conflict:
                    self._set_affinity_state(affinity, STATE_CONFIRMED)
                    raise
            self._delete_if_present(affinity)
            return True

        released = _with_retries(attempt)
        if released:
            self.hints.forget(host, cidr)
        return released

    def release_host_affinities(self, host: str, must_be_empty: bool = True) -> list[IPNetwork]:
        """Give up the blocks affine to `host`, a node that left the cluster; returns their
        CIDRs. Empty blocks go back to their pools. Blocks still holding addresses keep their
        affinity, or with `must_be_empty` False (the Node is being deleted) lose it and stay
        until their last address is released, as Calico's RemoveIPAMHost leaves them."""
        cidrs = [kvp.key.cidr for kvp in self.store.list(BlockAffinityListOptions(host))]
        return [cidr for cidr in cidrs if self._release_affinity(host, cidr, must_be_empty)]

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
                self._note(self.store.update(kvp), reserved)
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
                kvp = self.store.update(kvp)
            except (Conflict, NotFound):
                self._change_handle(handle_id, str(cidr), _add(-1))
                continue
            self._note(kvp, Reservations())
            return block.interface(ordinal)
        raise IPAMRetriesExhausted(MAX_RETRIES_MESSAGE)

    # --------------------------------------------------------------- handles

    def _change_handle(self, handle_id: str, block: str, new_count: Callable[[int], int]) -> None:
        """CAS-update one block's count in a handle; create it / delete it when empty.
        The handle as this engine last read or wrote it is the first guess (a new pod's
        handle is created without reading it first); a lost race re-reads it."""
        key = HandleKey(handle_id)
        known = self._handles.pop(handle_id, _UNREAD)
        for _ in range(RETRIES):
            try:
                self._handles[handle_id] = self._write_handle(key, block, new_count, known)
                return
            except (*_RETRYABLE, NotFound):
                known = self._get_or_none(key)
        raise IPAMRetriesExhausted(MAX_RETRIES_MESSAGE)

    def _write_handle(
        self, key: HandleKey, block: str, new_count: Callable[[int], int], known: Any
    ) -> KVPair | None:
        """Write the new count given the handle as believed stored; returns it as stored."""
        if known is _UNREAD and new_count(0) <= 0:
            known = self._get_or_none(key)  # nothing to create: change what is there
        if known is _UNREAD or known is None:
            count = new_count(0)
            if count <= 0:
                return None
            return self.store.create(KVPair(key, IPAMHandle({block: count})))
        counts = dict(known.value.block)
        count = new_count(counts.get(block, 0))
        if count > 0:
            counts[block] = count
        else:
            counts.pop(block, None)
        if counts:
            return self.store.update(KVPair(key, IPAMHandle(counts), known.revision))
        self.store.delete(known)
        return None

    def _get_or_none(self, key: Key) -> KVPair | None:
        try:
            return self.store.get(key)
        except NotFound:
            return None

    def list_handles(self) -> list[str]:
        """Stored handle IDs, unsanitised so that they can be passed to release_by_handle."""
        return [kvp.key.handle_id for kvp in self.store.list(HandleListOptions())]

    def _handle_blocks(self, handle_id: str) -> list[str]:
        kvp = self.store.get(HandleKey(handle_id))  # NotFound propagates
        self._handles[handle_id] = kvp
        return list(kvp.value.block)

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
                self._note(self.store.update(kvp), Reservations())
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
