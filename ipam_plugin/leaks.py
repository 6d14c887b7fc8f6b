"""Which allocations are no longer in use: the rules kube-controllers' IPAM garbage
collector (kube_controllers/ipam_gc.py) judges by. `calicoctl ipam check` does not use
them: it matches allocations against workload endpoints and nodes' tunnel addresses.

An allocation is in use until proven otherwise (kube-controllers' rule): one without pod
attributes, or whose pod has not reported an address yet (its ADD may be in flight), is
kept. It is unused when its pod is gone, was rescheduled to another node, or reports
addresses that no longer include it (a sandbox that failed after its ADD). A tunnel
address belongs to its node and is unused only once the node is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from libcalico.model import TUNNEL_ADDRESS_FIELDS, BlockListOptions

if TYPE_CHECKING:
    from libcalico.datastore.base import Datastore
    from libcalico.workloads import PodRecord, Snapshot

TUNNEL_TYPES = frozenset(attribute_type for attribute_type, _ in TUNNEL_ADDRESS_FIELDS)


@dataclass(frozen=True)
class Allocation:
    """One allocated address and what its block records about the owner."""

    ip: str
    block: str
    handle_id: str | None
    node: str  # the `node` attribute, else the block's affine host
    namespace: str
    pod: str
    kind: str  # the `type` attribute: a tunnel address type, or "" for a workload

    @property
    def is_tunnel(self) -> bool:
        return self.kind in TUNNEL_TYPES

    @property
    def key(self) -> tuple[str, str | None]:
        return self.ip, self.handle_id


@dataclass(frozen=True)
class Unused:
    """An allocation found unused, why, and whether its node is gone too (which makes the
    finding certain: kube-controllers releases those without a grace period)."""

    allocation: Allocation
    reason: str
    node_gone: bool


def allocations(store: Datastore) -> list[Allocation]:
    """Every allocated address of every block."""
    found = []
    for kvp in store.list(BlockListOptions()):
        block = kvp.value
        host = (block.affinity or "").removeprefix("host:")
        for ordinal in block.allocated_ordinals():
            attribute = block.attributes[block.allocations[ordinal]]
            attrs = attribute.secondary
            found.append(
                Allocation(
                    ip=str(block.ip(ordinal)),
                    block=str(block.cidr),
                    handle_id=attribute.handle_id,
                    node=attrs.get("node") or host,
                    namespace=attrs.get("namespace", ""),
                    pod=attrs.get("pod", ""),
                    kind=attrs.get("type", ""),
                )
            )
    return found


def why_unused(allocation: Allocation, pod: PodRecord | None, node_exists: bool) -> str | None:
    """Why `allocation` is no longer in use, or None while it may be. `pod` is its owner as
    the API server has it (None: not found)."""
    if allocation.is_tunnel:
        return None if node_exists else f"node {allocation.node} no longer exists"
    if not (allocation.namespace and allocation.pod):
        return None  # not a pod's address, or older than these attributes: assume in use
    if pod is None:
        return f"pod {allocation.namespace}/{allocation.pod} no longer exists"
    if pod.node and allocation.node and pod.node != allocation.node:
        return f"pod {pod.namespace}/{pod.name} now runs on node {pod.node}"
    if not pod.reported_ips:
        return None  # the pod has not reported its address yet: its ADD may be in flight
    if pod.holds(allocation.ip):
        return None
    return f"pod {pod.namespace}/{pod.name} holds other addresses"


def unused_allocations(found: list[Allocation], snapshot: Snapshot) -> list[Unused]:
    """The allocations a snapshot of pods and nodes shows unused."""
    unused = []
    for allocation in found:
        node_exists = allocation.node in snapshot.nodes
        pod = snapshot.pods.get((allocation.namespace, allocation.pod))
        reason = why_unused(allocation, pod, node_exists)
        if reason is not None:
            unused.append(Unused(allocation, reason, not node_exists))
    return unused
