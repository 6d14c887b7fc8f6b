"""IPAM garbage collection, as calico-kube-controllers' node controller does it.

Addresses leak when a CNI DEL never ran: a runtime that failed a sandbox after a
successful ADD and whose cleanup stopped early, a node that crashed or was deleted with
pods on it. Each scan judges every allocation against the cluster's pods and nodes
(ipam_plugin/leaks.py) and keeps the unused ones as candidates, with the time first seen:
- a candidate still unused after the leak grace period is confirmed; one whose node is
  gone too is confirmed at once (nothing can come back for it);
- a handle is released only when all of its addresses are confirmed (all or none, so a
  handle never disagrees with its blocks), and only after one more live read of its pod
  (of its node, for a tunnel address) says so: a pod that came back between scan and
  release keeps its address;
- a node that is gone has its empty blocks' affinities released once no address is
  left on them, so its blocks return to the pool.
Releases go through the IPAM engine, whose compare-and-swap writes make a concurrent
CNI ADD or DEL safe; every decision is logged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ipam_plugin.engine import IPAM
from ipam_plugin.leaks import Allocation, Unused, allocations, unused_allocations, why_unused
from libcalico.datastore.base import Datastore, NotFound
from libcalico.model import BlockAffinityListOptions
from libcalico.workloads import KubernetesWorkloads, PodRecord

log = logging.getLogger("kube-controllers")


@dataclass
class Candidate:
    """An allocation seen unused, since when (monotonic seconds)."""

    unused: Unused
    since: float


@dataclass
class ScanReport:
    """What one scan found and did."""

    candidates: int = 0


class IPAMGarbageCollector:
    """Leak candidates carried from scan to scan, and the releases they lead to."""

    def __init__(
        self,
        store: Datastore,
        workloads: KubernetesWorkloads,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ipam = IPAM(store)
        self.workloads = workloads
        self._clock = clock
        self._candidates: dict[tuple[str, str | None], Candidate] = {}

    def scan(self, leak_grace: float) -> ScanReport:
        """One pass; `leak_grace` 0 releases only the addresses of nodes that are gone."""
        now = self._clock()
        found = allocations(self.store)
        snapshot = self.workloads.snapshot()
        self._track(unused_allocations(found, snapshot), now)
        report = ScanReport(candidates=len(self._candidates))
        confirmed = {
            key
            for key, candidate in self._candidates.items()
            if candidate.unused.node_gone
            or (leak_grace > 0 and now - candidate.since >= leak_grace)
        }
        for owned in _by_handle(found):
            if all(a.key in confirmed for a in owned):
                self._release(owned)
        affinities = Counter(kvp.key.host for kvp in self.store.list(BlockAffinityListOptions()))
        for host in sorted(affinities.keys() - snapshot.nodes):
            if not self.workloads.node_exists(host):
                self._release_node_blocks(host, affinities[host])
        return report

    def _track(self, unused: list[Unused], now: float) -> None:
        """Start the clock for new candidates; drop those in use again."""
        current = {u.allocation.key: u for u in unused}
        for key, candidate in list(self._candidates.items()):
            if key not in current:
                log.info(
                    "Address in use again, no longer a leak candidate",
                    extra={"fields": _fields(candidate.unused.allocation)},
                )
                del self._candidates[key]
        for key, finding in current.items():
            if key not in self._candidates:
                log.info(
                    "Candidate IP leak: %s",
                    finding.reason,
                    extra={"fields": _fields(finding.allocation)},
                )
                self._candidates[key] = Candidate(finding, now)
            else:
                self._candidates[key].unused = finding

    def _release(self, owned: list[Allocation]) -> None:
        """Release a handle's addresses unless a live read shows one in use."""
        pods: dict[tuple[str, str], PodRecord | None] = {}
        for allocation in owned:
            # why_unused judges a tunnel address by its node alone, any other by its pod.
            pod = None
            node_exists = False
            if allocation.is_tunnel:
                node_exists = bool(allocation.node) and self.workloads.node_exists(allocation.node)
            elif allocation.pod and allocation.namespace:
                name = (allocation.namespace, allocation.pod)
                if name not in pods:
                    pods[name] = self.workloads.pod(*name)
                pod = pods[name]
            if why_unused(allocation, pod, node_exists) is None:
                log.info(
                    "Leaked IP has been resurrected after querying latest state",
                    extra={"fields": _fields(allocation)},
                )
                for other in owned:
                    self._candidates.pop(other.key, None)
                return
        for allocation in owned:
            log.info(
                "Garbage collecting leaked IP address: %s",
                self._candidates[allocation.key].unused.reason,
                extra={"fields": _fields(allocation)},
            )
        handle_id = owned[0].handle_id
        try:
            if handle_id is None:
                raise NotFound("the allocation has no handle")
            self.ipam.release_by_handle(handle_id)
        except NotFound:
            # No handle object (lost, or never written): free the addresses themselves.
            self.ipam.release_ips([a.ip for a in owned])
        for allocation in owned:
            self._candidates.pop(allocation.key, None)

    def _release_node_blocks(self, host: str, affinities: int) -> None:
        """Release the empty blocks of `host`, which had `affinities` block affinities."""
        released = [str(cidr) for cidr in self.ipam.release_host_affinities(host)]
        if released:
            log.info(
                "Released the blocks of a node that no longer exists",
                extra={"fields": {"node": host, "blocks": ",".join(released)}},
            )
        if len(released) < affinities:
            log.info(
                "Can't clean up node yet - IPs still in use on this node",
                extra={"fields": {"node": host}},
            )


def _by_handle(found: list[Allocation]) -> list[list[Allocation]]:
    """Allocations grouped by handle; each one without a handle is a group of its own."""
    groups: dict[str, list[Allocation]] = {}
    loose = []
    for allocation in found:
        if allocation.handle_id is None:
            loose.append([allocation])
        else:
            groups.setdefault(allocation.handle_id, []).append(allocation)
    return [*groups.values(), *loose]


def _fields(allocation: Allocation) -> dict[str, str]:
    fields = {"ip": allocation.ip, "block": allocation.block, "node": allocation.node}
    if allocation.handle_id:
        fields["handle"] = allocation.handle_id
    if allocation.pod:
        fields["pod"] = f"{allocation.namespace}/{allocation.pod}"
    return fields
