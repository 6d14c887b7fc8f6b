"""What the calico plugin records in an etcd datastore: WorkloadEndpoints and Profiles.

Real Calico writes a WorkloadEndpoint per pod interface, named from its identifiers
(`libcalico-go/lib/names/workloadendpoint.go`), keeps the active container ID on it so a
late DEL for an old sandbox cannot delete a live pod's endpoint (calico#1117), and refuses
ADD while ClusterInformation says the datastore is not ready. In the Kubernetes datastore
the Pod itself plays the endpoint's part, so none of this applies there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cni_plugin.types import IPInterface
from libcalico.datastore.base import AlreadyExists, Datastore, KVPair, NotFound
from libcalico.model import (
    ObjectMeta,
    Profile,
    ResourceKey,
    WorkloadEndpoint,
)

if TYPE_CHECKING:
    from cni_plugin.k8s import Pod

log = logging.getLogger("cni-plugin")


@dataclass
class WorkloadID:
    """The identifiers a WorkloadEndpoint's name is built from."""

    node: str
    orchestrator: str  # "k8s" or "cni"
    namespace: str
    workload: str  # the pod name (k8s) or the container ID (cni)
    endpoint: str  # the pod's interface name

    @classmethod
    def of(cls, node: str, args: dict[str, str], container_id: str, ifname: str) -> WorkloadID:
        namespace, pod = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
        if namespace and pod:
            return cls(node, "k8s", namespace, pod, ifname)
        return cls(node, "cni", "default", container_id, ifname)

    @property
    def name(self) -> str:
        """Each segment with `-` doubled, joined by single dashes: node1-k8s-my--pod-eth0."""
        segments = (self.node, self.orchestrator, self.workload, self.endpoint)
        return "-".join(s.replace("-", "--") for s in segments)

    @property
    def key(self) -> ResourceKey:
        return ResourceKey("WorkloadEndpoint", self.name, self.namespace)


def _fields(wid: WorkloadID, **extra: str) -> dict[str, dict[str, str]]:
    """The `extra` of a log record about this endpoint, in Calico's k=v field style."""
    return {"fields": {"WorkloadEndpoint": wid.name, **extra}}


def write_endpoint(
    store: Datastore,
    wid: WorkloadID,
    container_id: str,
    host_ifname: str,
    mac: str,
    ips: list[IPInterface],
    profiles: list[str],
    pod: Pod | None = None,
) -> None:
    """The endpoint as Calico writes it; with the Pod (policy type k8s), also its labels,
    UID and service account, which policy selectors and profiles match on."""
    labels = dict(pod.labels) if pod else {}
    labels.update(
        {
            "projectcalico.org/namespace": wid.namespace,
            "projectcalico.org/orchestrator": wid.orchestrator,
        }
    )
    meta = {"namespace": wid.namespace}
    if pod is not None and pod.uid:
        meta["uid"] = pod.uid
    account = pod.service_account if pod else ""
    if account:
        profiles = [*profiles, f"ksa.{wid.namespace}.{account}"]
        if len(account) < 63:
            labels["projectcalico.org/serviceaccount"] = account
    spec = {
        "orchestrator": wid.orchestrator,
        "node": wid.node,
        "containerID": container_id,
        "endpoint": wid.endpoint,
        "ipNetworks": [str(ip) for ip in ips],
        "profiles": profiles,
        "interfaceName": host_ifname,
        "mac": mac,
    }
    if wid.orchestrator == "k8s":
        spec["pod"] = wid.workload
    else:
        spec["workload"] = wid.workload
    if account:
        spec["serviceAccountName"] = account
    meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    endpoint = WorkloadEndpoint(ObjectMeta(wid.name, labels, meta), spec)
    try:
        store.create(KVPair(wid.key, endpoint))
    except AlreadyExists:
        # A kubelet retry of ADD for the same pod: the new sandbox's details win.
        current = store.get(wid.key)
        store.update(KVPair(wid.key, endpoint, current.revision))
    log.info("Wrote updated endpoint to datastore", extra=_fields(wid))


def delete_endpoint(store: Datastore, wid: WorkloadID, container_id: str) -> None:
    """Delete the endpoint unless it belongs to a newer sandbox of the same pod."""
    try:
        current = store.get(wid.key)
    except NotFound:
        log.warning("WorkloadEndpoint does not exist", extra=_fields(wid))
        return
    owner = current.value.spec.get("containerID", "")
    if owner and owner != container_id:
        log.warning(
            "CNI_CONTAINERID does not match the endpoint's container ID: not deleting it",
            extra=_fields(wid, EndpointContainerID=owner),
        )
        return
    with contextlib.suppress(NotFound):
        store.delete(current)


def ensure_profile(store: Datastore, network: str, orchestrator: str) -> None:
    """The per-network Profile Calico creates when policy.type is empty; never updated."""
    key = ResourceKey("Profile", network)
    try:
        store.get(key)
        return
    except NotFound:
        pass
    ingress = {"action": "Allow"}
    if orchestrator != "k8s":
        ingress["source"] = {"selector": f"has({network})"}
    spec = {"ingress": [ingress], "egress": [{"action": "Allow"}], "labelsToApply": {network: ""}}
    with contextlib.suppress(AlreadyExists):
        store.create(KVPair(key, Profile(ObjectMeta(network), spec)))
