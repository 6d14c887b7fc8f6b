"""What deleting a Node takes with it on the etcd and local datastores, as calicoctl does
(libcalico-go's node client): the node's workload endpoints and their addresses, its
tunnel addresses, its blocks' affinities and its per-node configuration. Without this a
decommissioned node's blocks stay affine to it and its addresses stay allocated forever.
On the Kubernetes datastore the cluster deletes Nodes, and calico-kube-controllers'
IPAM GC releases what they held."""

from __future__ import annotations

import contextlib

from ipam_plugin.engine import IPAM
from libcalico.datastore.base import Datastore, NotFound
from libcalico.model import Node, ResourceKey, ResourceListOptions

# Configuration kept per node under the name `node.<nodename>`.
PER_NODE_KINDS = ("FelixConfiguration", "BGPConfiguration")


def remove_node_data(store: Datastore, node: Node) -> None:
    """Release and delete what belongs to `node` alone; the Node itself is the caller's."""
    name = node.metadata.name
    endpoints = [
        kvp
        for kvp in store.list(ResourceListOptions("WorkloadEndpoint"))
        if kvp.value.spec.get("node") == name
    ]
    addresses = [address for kvp in endpoints for address in kvp.value.addresses()]
    released = addresses + node.tunnel_addresses()
    ipam = IPAM(store)
    if released:
        ipam.release_ips(released)
    for kvp in endpoints:
        with contextlib.suppress(NotFound):
            store.delete(kvp)
    ipam.release_host_affinities(name, must_be_empty=False)
    for kind in PER_NODE_KINDS:
        with contextlib.suppress(NotFound):
            store.delete(store.get(ResourceKey(kind, f"node.{name}")))
