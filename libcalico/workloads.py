"""The workloads and nodes IPAM allocations belong to, as the orchestrator knows them.

An allocation records who asked for it (`node`, `namespace`, `pod` attributes); whether
that owner still exists, and still holds the address, is a question for Kubernetes, not
for Calico's data. kube-controllers' IPAM garbage collection asks it here: one list of
pods and one of nodes per scan (paged), and a fresh GET of a pod (or, for a tunnel
address, its node) just before anything is released, so a decision never rests on a stale
list alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from libcalico.datastore.base import NotFound

if TYPE_CHECKING:
    from libcalico.datastore.k8s_client import KubeClient

POD_IP_ANNOTATION = "cni.projectcalico.org/podIP"
POD_IPS_ANNOTATION = "cni.projectcalico.org/podIPs"
LIST_PAGE = 500


@dataclass(frozen=True)
class PodRecord:
    """What deciding an allocation's fate needs of a pod."""

    namespace: str
    name: str
    node: str  # spec.nodeName, "" while unscheduled
    reported_ips: frozenset[str]  # status.podIPs: what kubelet reported
    annotated_ips: frozenset[str]  # Calico's podIP/podIPs annotations: what the CNI recorded

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> PodRecord:
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        reported = {entry.get("ip", "") for entry in status.get("podIPs") or []}
        reported.add(status.get("podIP") or "")
        annotations = metadata.get("annotations") or {}
        annotated = {annotations.get(POD_IP_ANNOTATION, "")}
        annotated.update((annotations.get(POD_IPS_ANNOTATION) or "").split(","))
        return cls(
            namespace=metadata.get("namespace", ""),
            name=metadata.get("name", ""),
            node=(pod.get("spec") or {}).get("nodeName") or "",
            reported_ips=frozenset(_address(ip) for ip in reported if ip.strip()),
            annotated_ips=frozenset(_address(ip) for ip in annotated if ip.strip()),
        )

    def holds(self, ip: str) -> bool:
        return ip in self.reported_ips or ip in self.annotated_ips


def _address(text: str) -> str:
    """`10.0.0.5/32` or ` 10.0.0.5` -> `10.0.0.5` (annotations carry a prefix length)."""
    return text.strip().split("/", 1)[0]


@dataclass
class Snapshot:
    """Every pod (by namespace and name) and every node name, read in one scan."""

    pods: dict[tuple[str, str], PodRecord]
    nodes: set[str]


class KubernetesWorkloads:
    """Pods and nodes from the API server the Kubernetes datastore talks to."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    def snapshot(self) -> Snapshot:
        pods = {}
        for pod in self._list("/api/v1/pods"):
            record = PodRecord.from_pod(pod)
            pods[record.namespace, record.name] = record
        nodes = {
            (node.get("metadata") or {}).get("name", "") for node in self._list("/api/v1/nodes")
        }
        nodes.discard("")
        return Snapshot(pods, nodes)

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        """The pod as the API server has it now, or None when it does not exist."""
        try:
            return PodRecord.from_pod(
                self.client.get(f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}")
            )
        except NotFound:
            return None

    def node_exists(self, name: str) -> bool:
        try:
            self.client.get(f"/api/v1/nodes/{quote(name)}")
        except NotFound:
            return False
        return True

    def _list(self, collection: str) -> Iterator[dict[str, Any]]:
        """Every object of a collection, in pages (the API server's `continue` token)."""
        query = f"limit={LIST_PAGE}"
        while True:
            page = self.client.get(collection, query)
            yield from page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            query = f"limit={LIST_PAGE}&continue={quote(token, safe='')}"
