"""The `kubernetes` datastore: Calico's IPAM objects as CRDs in `crd.projectcalico.org/v1`.

Each key maps to one custom resource, named and shaped as libcalico-go's KDD backend
names and shapes them (calico-behaviour.md §4.6, §4.8), so real Calico components can share
the data: blocks `10-244-0-64-26`, affinities `<node>-<cidr name>` with Calico's labels,
handles lower-cased with the original ID in `spec.handleID`, singletons named `default`.

Compare-and-swap is the API server's: every update and delete carries the resourceVersion
read before it (409 → Conflict). Because Kubernetes cannot delete conditionally on the
*content*, blocks, affinities and handles are deleted in two steps, as Calico does: an
update setting `deleted` (the CAS), then a delete preconditioned on the resulting
resourceVersion. A reader that meets an object marked deleted finishes the job and reports
NotFound; lists leave such objects out.

Nodes are the cluster's real Nodes (`/api/v1/nodes`), read-only: their labels feed IP
pools' nodeSelector. WorkloadEndpoints and Profiles have no place here (the Pod is the
endpoint), so keys of those kinds are refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

from libcalico.datastore.base import (
    Conflict,
    Datastore,
    DatastoreCorrupt,
    DatastoreError,
    KVPair,
    NotFound,
)
from libcalico.datastore.k8s_client import KubeClient
from libcalico.model import (
    API_VERSION,
    METADATA_ANNOTATION,
    RESOURCE_PLURALS,
    RESOURCE_TYPES,
    AllocationBlock,
    BlockAffinity,
    BlockAffinityKey,
    BlockAffinityListOptions,
    BlockKey,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    IPAMConfig,
    IPAMConfigKey,
    IPAMHandle,
    IPNetwork,
    Key,
    ListOptions,
    Node,
    ObjectMeta,
    Profile,
    ResourceKey,
    ResourceListOptions,
    Value,
    WorkloadEndpoint,
    ordered_metadata,
)

GROUP_VERSION = "crd.projectcalico.org/v1"
CRD_ROOT = f"/apis/{GROUP_VERSION}"
LABEL_HOSTNAME_HASH = "projectcalico.org/hostname-hash"
LABEL_AFFINITY_TYPE = "projectcalico.org/affinity-type"
LABEL_IP_VERSION = "projectcalico.org/ip-version"
MAX_NAME = 253
LIST_PAGE = 500
# Server-maintained metadata that must not travel back in a create or replace.
_SERVER_METADATA = ("resourceVersion", "managedFields", "selfLink")


def cidr_name(cidr: IPNetwork) -> str:
    """libcalico-go's names.CIDRToName: `10.0.0.64/26` → `10-0-0-64-26`, `fd00::40/122` →
    `fd00--40-122`."""
    return str(cidr).replace(".", "-").replace(":", "-").replace("/", "-")


def affinity_name(host: str, cidr: IPNetwork) -> str:
    """`<host>-<cidr name>`; too long for an object name, the host is cut and a hash of
    `<host>+<cidr name>` keeps it unique (ipam_affinity_v1.go parseKey)."""
    suffix = cidr_name(cidr)
    name = f"{host}-{suffix}"
    if len(name) < MAX_NAME:
        return name
    digest = hashlib.sha256(f"{host}+{suffix}".encode()).hexdigest()[:11]
    return f"{host[: MAX_NAME - 1 - len(suffix) - 13]}-{suffix}-{digest}"


def hostname_hash(host: str) -> str:
    """The `projectcalico.org/hostname-hash` label: SHA3-256, base32 without padding (fits
    the 63-character label limit where a hostname may not)."""
    return base64.b32encode(hashlib.sha3_256(host.encode()).digest()).decode().rstrip("=")


def affinity_labels(host: str | None, affinity_type: str, version: int | None) -> dict[str, str]:
    """Calico's BlockAffinity labels; with host or version None, the selector for a list."""
    labels = {LABEL_AFFINITY_TYPE: affinity_type}
    if host is not None:
        labels[LABEL_HOSTNAME_HASH] = hostname_hash(host)
    if version is not None:
        labels[LABEL_IP_VERSION] = str(version)
    return labels


def _go_bool(text: Any) -> bool:
    """strconv.ParseBool's true spellings (BlockAffinity `deleted` is a string in v1)."""
    return str(text) in ("1", "t", "T", "true", "TRUE", "True")


# ----------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Decoded:
    """One custom resource read back as a key and its value."""

    key: Key
    value: Value


@dataclass(frozen=True)
class Codec:
    """How one kind of key is named, shaped and found in the API."""

    kind: str
    plural: str
    two_step_delete: bool = False
    root: str = CRD_ROOT
    # The object is Kubernetes' own (a Node): an update merges into the live object.
    merges: ClassVar[bool] = False
    # Operations this kind refuses, and why.
    refused: ClassVar[dict[str, str]] = {}

    def collection(self, key: Key | None = None) -> str:
        """Where objects are created (for `key`) or listed (every namespace)."""
        return f"{self.root}/{self.plural}"

    def check(self, operation: str) -> None:
        if operation in self.refused:
            raise DatastoreError(
                f"operation {operation} is not supported on {self.kind} in the Kubernetes "
                f"datastore: {self.refused[operation]}"
            )

    def selects(self, obj: dict[str, Any]) -> bool:
        """Whether a listed object stands for one of ours."""
        return True

    def revision(self, obj: dict[str, Any]) -> str | None:
        return obj["metadata"].get("resourceVersion")

    def update_path(self, key: Key) -> str:
        return self.path(key)

    def merge(self, current: dict[str, Any], key: Key, value: Value) -> dict[str, Any]:
        raise NotImplementedError

    def path(self, key: Key) -> str:
        return f"{self.collection()}/{quote(self.name(key), safe='')}"

    def name(self, key: Key) -> str:
        raise NotImplementedError

    def encode(self, key: Key, value: Value) -> dict[str, Any]:
        """The object without resourceVersion: apiVersion, kind, metadata, spec."""
        raise NotImplementedError

    def decode(self, obj: dict[str, Any]) -> Decoded:
        raise NotImplementedError

    def _object(
        self, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name}
        if labels:
            metadata["labels"] = labels
        return {"apiVersion": GROUP_VERSION, "kind": self.kind, "metadata": metadata, "spec": spec}


class BlockCodec(Codec):
    def name(self, key: BlockKey) -> str:
        return cidr_name(key.cidr)

    def encode(self, key: BlockKey, value: AllocationBlock) -> dict[str, Any]:
        spec = value.to_json()
        if "affinity_claim_time" in spec:
            spec["affinityClaimTime"] = spec.pop("affinity_claim_time")
        if spec.get("affinity") is None:
            spec.pop("affinity")
        spec["strictAffinity"] = False  # deprecated, required by the CRD
        return self._object(self.name(key), spec)

    def decode(self, obj: dict[str, Any]) -> Decoded:
        spec = dict(obj["spec"])
        if "affinityClaimTime" in spec:
            spec["affinity_claim_time"] = spec.pop("affinityClaimTime")
        block = AllocationBlock.from_json(spec)
        return Decoded(BlockKey(block.cidr), block)


class AffinityCodec(Codec):
    def name(self, key: BlockAffinityKey) -> str:
        return affinity_name(key.host, key.cidr)

    def encode(self, key: BlockAffinityKey, value: BlockAffinity) -> dict[str, Any]:
        spec = {
            "state": value.state,
            "node": key.host,
            "type": key.affinity_type,
            "cidr": str(key.cidr),
            "deleted": "true" if value.deleted else "false",
        }
        labels = affinity_labels(key.host, key.affinity_type, key.cidr.version)
        return self._object(self.name(key), spec, labels)

    def decode(self, obj: dict[str, Any]) -> Decoded:
        spec = obj["spec"]
        key = BlockAffinityKey(
            spec["node"], ipaddress.ip_network(spec["cidr"]), spec.get("type") or "host"
        )
        return Decoded(key, BlockAffinity(spec.get("state") or "", _go_bool(spec.get("deleted"))))


class HandleCodec(Codec):
    def name(self, key: HandleKey) -> str:
        return key.handle_id.lower()

    def encode(self, key: HandleKey, value: IPAMHandle) -> dict[str, Any]:
        return self._object(self.name(key), {"handleID": key.handle_id, **value.to_json()})

    def decode(self, obj: dict[str, Any]) -> Decoded:
        spec = obj["spec"]
        return Decoded(HandleKey(spec["handleID"]), IPAMHandle.from_json(spec))


class IPAMConfigCodec(Codec):
    def name(self, key: IPAMConfigKey) -> str:
        return "default"

    def encode(self, key: IPAMConfigKey, value: IPAMConfig) -> dict[str, Any]:
        spec = {
            **value.extra,
            "strictAffinity": value.strict_affinity,
            "autoAllocateBlocks": value.auto_allocate_blocks,
        }
        if value.max_blocks_per_host:
            spec["maxBlocksPerHost"] = value.max_blocks_per_host
        return self._object("default", spec)

    def decode(self, obj: dict[str, Any]) -> Decoded:
        spec = dict(obj["spec"])
        config = IPAMConfig(
            strict_affinity=bool(spec.pop("strictAffinity", False)),
            auto_allocate_blocks=bool(spec.pop("autoAllocateBlocks", False)),
            max_blocks_per_host=int(spec.pop("maxBlocksPerHost", 0) or 0),
            extra=spec,
        )
        return Decoded(IPAMConfigKey(), config)


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj["metadata"].items() if k not in _SERVER_METADATA}


def convert_uid(uid: str) -> str:
    """The v3 UID Calico shows for a CRD's UID, and back (the mapping is its own inverse):
    the bits of every byte reversed except the version and variant bytes (6 and 8), so a
    v3 object and its backing CRD never share a UID (observed from calicoctl v3.31.7)."""
    try:
        raw = bytearray(uuid.UUID(uid).bytes)
    except ValueError:
        return uid
    for index, byte in enumerate(raw):
        if index not in (6, 8):
            raw[index] = int(f"{byte:08b}"[::-1], 2)
    return str(uuid.UUID(bytes=bytes(raw)))


def _ours(key: str) -> bool:
    """Labels and annotations Calico keeps on the CRD itself (libcalico-go's isOurs)."""
    return "projectcalico.org/" in key or "operator.tigera.io/" in key


def _compact(doc: dict[str, Any]) -> str:
    """Go's json.Marshal of a map: keys sorted, no spaces."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _json_map(text: Any) -> dict[str, Any]:
    """An annotation holding a JSON object; {} when it holds anything else."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class ResourceCodec(Codec):
    """v3 resources as Calico's CRDs (IPPool, BGPPeer, NetworkPolicy, ...): the spec as is;
    the v3 metadata in the `projectcalico.org/metadata` annotation, the CRD's own metadata
    holding only the name (a policy's tiered name), namespace, and Calico's labels and
    annotations; the v3 UID derived from the CRD's (libcalico-go's CRD conversion)."""

    namespaced: bool = False

    def collection(self, key: Key | None = None) -> str:
        if self.namespaced and isinstance(key, ResourceKey):
            return f"{self.root}/namespaces/{quote(key.namespace, safe='')}/{self.plural}"
        return f"{self.root}/{self.plural}"

    def path(self, key: Key) -> str:
        return f"{self.collection(key)}/{quote(self.name(key), safe='')}"

    def name(self, key: ResourceKey) -> str:
        return key.name

    def encode(self, key: ResourceKey, value: Value) -> dict[str, Any]:
        doc = value.to_json()
        meta = dict(doc.get("metadata") or {})
        annotations = dict(meta.pop("annotations", None) or {})
        stash = _json_map(annotations.pop(METADATA_ANNOTATION, None))
        labels = meta.get("labels") or {}
        for field_name in ("name", "namespace", "resourceVersion", "uid"):
            meta.pop(field_name, None)
        if "name" in stash:
            meta["name"] = stash["name"]  # a policy's v3 name, beside its tiered one
        if annotations:
            meta["annotations"] = annotations
        crd_meta: dict[str, Any] = {"name": key.name}
        if self.namespaced:
            crd_meta["namespace"] = key.namespace
        ours_labels = {k: v for k, v in labels.items() if _ours(k)}
        if ours_labels:
            crd_meta["labels"] = ours_labels
        crd_meta["annotations"] = {
            **{k: v for k, v in annotations.items() if _ours(k)},
            METADATA_ANNOTATION: json.dumps(ordered_metadata(meta), separators=(",", ":")),
        }
        obj: dict[str, Any] = {
            "apiVersion": GROUP_VERSION,
            "kind": self.kind,
            "metadata": crd_meta,
            "spec": doc.get("spec") or {},
        }
        return obj

    def decode(self, obj: dict[str, Any]) -> Decoded:
        crd_meta = obj["metadata"]
        annotations = dict(crd_meta.get("annotations") or {})
        stash = _json_map(annotations.pop(METADATA_ANNOTATION, None))
        labels = {**(crd_meta.get("labels") or {}), **(stash.get("labels") or {})}
        annotations.update(stash.get("annotations") or {})
        meta = {k: v for k, v in stash.items() if k not in ("name", "labels", "annotations")}
        meta["name"] = crd_meta["name"]
        if self.namespaced:
            meta["namespace"] = crd_meta.get("namespace", "")
        if crd_meta.get("uid"):
            meta["uid"] = convert_uid(crd_meta["uid"])
        meta.setdefault("creationTimestamp", crd_meta.get("creationTimestamp"))
        if "name" in stash:
            annotations[METADATA_ANNOTATION] = json.dumps({"name": stash["name"]})
        if labels:
            meta["labels"] = labels
        if annotations:
            meta["annotations"] = annotations
        doc = {
            "kind": self.kind,
            "apiVersion": API_VERSION,
            "metadata": ordered_metadata({k: v for k, v in meta.items() if v is not None}),
            "spec": obj.get("spec") or {},
        }
        if obj.get("status") is not None:
            doc["status"] = obj["status"]
        value = RESOURCE_TYPES[self.kind].from_json(doc)
        namespace = crd_meta.get("namespace", "") if self.namespaced else ""
        return Decoded(ResourceKey(self.kind, crd_meta["name"], namespace), value)


class NamespacedResourceCodec(ResourceCodec):
    """NetworkPolicy and NetworkSet: CRDs in the resource's namespace."""

    namespaced = True


# The Calico Node's fields a Kubernetes Node carries as annotations (libcalico-go's
# resources/node.go), in the order Calico lists them: spec.bgp's, then spec's.
_NODE_BGP_ANNOTATIONS = {
    "ipv4Address": "projectcalico.org/IPv4Address",
    "ipv6Address": "projectcalico.org/IPv6Address",
    "ipv4IPIPTunnelAddr": "projectcalico.org/IPv4IPIPTunnelAddr",
    "routeReflectorClusterID": "projectcalico.org/RouteReflectorClusterID",
    "asNumber": "projectcalico.org/ASNumber",
}
_NODE_SPEC_ANNOTATIONS = {
    "ipv4VXLANTunnelAddr": "projectcalico.org/IPv4VXLANTunnelAddr",
    "vxlanTunnelMACAddr": "projectcalico.org/VXLANTunnelMACAddr",
    "ipv6VXLANTunnelAddr": "projectcalico.org/IPv6VXLANTunnelAddr",
    "vxlanTunnelMACAddrV6": "projectcalico.org/VXLANTunnelMACAddrV6",
}
_NODE_WIREGUARD_ANNOTATIONS = {
    "interfaceIPv4Address": "projectcalico.org/IPv4WireguardInterfaceAddr",
    "interfaceIPv6Address": "projectcalico.org/IPv6WireguardInterfaceAddr",
}
_NODE_STATUS_ANNOTATIONS = {
    "wireguardPublicKey": "projectcalico.org/WireguardPublicKey",
    "wireguardPublicKeyV6": "projectcalico.org/WireguardPublicKeyV6",
}
NODE_LABELS_ANNOTATION = "projectcalico.org/labels"
NODE_ANNOTATIONS_ANNOTATION = "projectcalico.org/annotations"
NODE_KUBE_LABELS_ANNOTATION = "projectcalico.org/kube-labels"


def _node_addresses(bgp: dict[str, Any], status: dict[str, Any]) -> list[dict[str, str]]:
    addresses = [
        {"address": bgp[field_name], "type": "CalicoNodeIP"}
        for field_name in ("ipv4Address", "ipv6Address")
        if bgp.get(field_name)
    ]
    kinds = {"InternalIP": "InternalIP", "ExternalIP": "ExternalIP"}
    for address in status.get("addresses") or []:
        if address.get("type") in kinds:
            addresses.append({"address": address["address"], "type": kinds[address["type"]]})
    return addresses


class NodeCodec(Codec):
    """A Calico Node in the Kubernetes datastore is the cluster's Node: its labels, plus
    Calico's own labels, BGP addresses, AS number, route-reflector cluster ID and tunnel
    addresses in `projectcalico.org/*` annotations. Kubelet creates and deletes Nodes;
    Calico only updates them (through the status subresource), as real Calico does."""

    merges = True
    refused: ClassVar[dict[str, str]] = {
        "Create": "kubelet registers Nodes; Calico only adds its settings to them",
        "Delete": "the Node goes when the cluster removes it",
    }

    def name(self, key: ResourceKey) -> str:
        return key.name

    def update_path(self, key: Key) -> str:
        return self.path(key) + "/status"

    def merge(self, current: dict[str, Any], key: Key, value: Value) -> dict[str, Any]:
        """`current` (the live Node) with the Calico Node's settings written into it."""
        node = value.api_json()
        obj = json.loads(json.dumps(current))
        meta = obj["metadata"]
        annotations = dict(meta.get("annotations") or {})
        kube_labels = dict(meta.get("labels") or {})
        calico_annotations = dict(node["metadata"].get("annotations") or {})
        inherited = _json_map(calico_annotations.pop(NODE_KUBE_LABELS_ANNOTATION, None))
        calico_labels = {
            k: v
            for k, v in (node["metadata"].get("labels") or {}).items()
            if k not in inherited and k not in kube_labels
        }
        for name, content in (
            (NODE_LABELS_ANNOTATION, calico_labels),
            (NODE_ANNOTATIONS_ANNOTATION, calico_annotations),
        ):
            if content:
                annotations[name] = _compact(content)
            else:
                annotations.pop(name, None)
        spec = node.get("spec") or {}
        bgp = spec.get("bgp") or {}
        groups = (
            (bgp, _NODE_BGP_ANNOTATIONS),
            (spec, _NODE_SPEC_ANNOTATIONS),
            (spec.get("wireguard") or {}, _NODE_WIREGUARD_ANNOTATIONS),
            (node.get("status") or {}, _NODE_STATUS_ANNOTATIONS),
        )
        for source, names in groups:
            for field_name, annotation in names.items():
                if source.get(field_name) not in (None, ""):
                    annotations[annotation] = str(source[field_name])
                else:
                    annotations.pop(annotation, None)
        meta["annotations"] = annotations
        return obj

    def decode(self, obj: dict[str, Any]) -> Decoded:
        meta = obj["metadata"]
        annotations = meta.get("annotations") or {}
        kube_labels = dict(meta.get("labels") or {})
        labels = {**_json_map(annotations.get(NODE_LABELS_ANNOTATION)), **kube_labels}
        node_annotations = {
            **_json_map(annotations.get(NODE_ANNOTATIONS_ANNOTATION)),
            NODE_KUBE_LABELS_ANNOTATION: _compact(kube_labels),
        }
        spec: dict[str, Any] = {}
        bgp = {f: annotations[a] for f, a in _NODE_BGP_ANNOTATIONS.items() if annotations.get(a)}
        if "asNumber" in bgp:
            try:
                bgp["asNumber"] = int(bgp["asNumber"])
            except ValueError:
                del bgp["asNumber"]  # Calico ignores an AS number it cannot read
        status: dict[str, Any] = {
            f: annotations[a] for f, a in _NODE_STATUS_ANNOTATIONS.items() if annotations.get(a)
        }
        kube_spec = obj.get("spec") or {}
        if kube_spec.get("podCIDRs"):
            status["podCIDRs"] = list(kube_spec["podCIDRs"])
        addresses = _node_addresses(bgp, obj.get("status") or {})
        if addresses:
            spec["addresses"] = addresses
        if bgp:
            spec["bgp"] = bgp
        for field_name, annotation in _NODE_SPEC_ANNOTATIONS.items():
            if annotations.get(annotation):
                spec[field_name] = annotations[annotation]
        wireguard = {
            f: annotations[a] for f, a in _NODE_WIREGUARD_ANNOTATIONS.items() if annotations.get(a)
        }
        if wireguard:
            spec["wireguard"] = wireguard
        spec["orchRefs"] = [{"nodeName": meta["name"], "orchestrator": "k8s"}]
        extra = {k: meta[k] for k in ("uid", "creationTimestamp") if meta.get(k)}
        extra["annotations"] = node_annotations
        node = Node(ObjectMeta(meta["name"], labels, extra), spec, status)
        return Decoded(ResourceKey("Node", node.metadata.name), node)


_DERIVED = "it is derived from Kubernetes objects; change those instead"


class _ReadOnlyCodec(Codec):
    """Objects Kubernetes owns that Calico presents as its own (pods, namespaces)."""

    refused: ClassVar[dict[str, str]] = {op: _DERIVED for op in ("Create", "Update", "Delete")}


WEP_LABEL_NAMESPACE = "projectcalico.org/namespace"
WEP_LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"
WEP_LABEL_SERVICE_ACCOUNT = "projectcalico.org/serviceaccount"
POD_IPS_ANNOTATION = "cni.projectcalico.org/podIPs"
POD_IP_ANNOTATION = "cni.projectcalico.org/podIP"
CONTAINER_ID_ANNOTATION = "cni.projectcalico.org/containerID"


def workload_endpoint_name(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """Each segment with `-` doubled, joined by single dashes (libcalico-go's names)."""
    return "-".join(s.replace("-", "--") for s in (node, orchestrator, workload, endpoint))


def pod_of_endpoint(name: str) -> str | None:
    """The pod a `<node>-k8s-<pod>-eth0` endpoint name stands for, or None."""
    segments = re.split(r"(?<!-)-(?!-)", name)
    if len(segments) != 4 or segments[1] != "k8s":
        return None
    return segments[2].replace("--", "-")


def pod_veth_name(namespace: str, pod: str) -> str:
    """The host-side veth Calico names after a pod: `cali` + 11 hex of SHA-1(ns.pod)."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def _pod_networks(pod: dict[str, Any]) -> list[str]:
    annotations = pod["metadata"].get("annotations") or {}
    text = annotations.get(POD_IPS_ANNOTATION) or annotations.get(POD_IP_ANNOTATION) or ""
    networks = [n.strip() for n in text.split(",") if n.strip()]
    if not networks:
        for entry in (pod.get("status") or {}).get("podIPs") or []:
            ip = ipaddress.ip_address(entry["ip"])
            networks.append(f"{ip}/{ip.max_prefixlen}")
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return []  # a finished pod no longer owns its addresses
    return networks


class WorkloadEndpointCodec(_ReadOnlyCodec):
    """Pods as Calico's WorkloadEndpoints (libcalico-go's pod conversion): one per pod
    scheduled to a node and not on the host network, named `<node>-k8s-<pod>-eth0`."""

    def collection(self, key: Key | None = None) -> str:
        if isinstance(key, ResourceKey):
            return f"{self.root}/namespaces/{quote(key.namespace, safe='')}/pods"
        return f"{self.root}/pods"

    def path(self, key: Key) -> str:
        return f"{self.collection(key)}/{quote(self.name(key), safe='')}"

    def name(self, key: ResourceKey) -> str:
        pod = pod_of_endpoint(key.name)
        if pod is None:
            raise NotFound(f"{key.name} is not the name of a Kubernetes pod's endpoint")
        return pod

    def selects(self, obj: dict[str, Any]) -> bool:
        spec = obj.get("spec") or {}
        return bool(spec.get("nodeName")) and not spec.get("hostNetwork")

    def decode(self, obj: dict[str, Any]) -> Decoded:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        namespace, pod, node = meta["namespace"], meta["name"], spec.get("nodeName") or ""
        account = spec.get("serviceAccountName") or ""
        labels = {
            **(meta.get("labels") or {}),
            WEP_LABEL_NAMESPACE: namespace,
            WEP_LABEL_ORCHESTRATOR: "k8s",
        }
        profiles = [f"kns.{namespace}"]
        if account:
            profiles.append(f"ksa.{namespace}.{account}")
            if len(account) < 63:
                labels[WEP_LABEL_SERVICE_ACCOUNT] = account
        name = workload_endpoint_name(node, "k8s", pod, "eth0")
        endpoint: dict[str, Any] = {"orchestrator": "k8s", "node": node, "pod": pod}
        container = (meta.get("annotations") or {}).get(CONTAINER_ID_ANNOTATION)
        if container:
            endpoint["containerID"] = container
        endpoint.update(
            endpoint="eth0",
            interfaceName=pod_veth_name(namespace, pod),
            ipNetworks=_pod_networks(obj),
            profiles=profiles,
        )
        if account:
            endpoint["serviceAccountName"] = account
        extra = {"namespace": namespace}
        for name_field in ("uid", "creationTimestamp", "generateName"):
            if meta.get(name_field):
                extra[name_field] = meta[name_field]
        wep = WorkloadEndpoint(ObjectMeta(name, labels, extra), endpoint)
        return Decoded(ResourceKey("WorkloadEndpoint", name, namespace), wep)


DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"


def _allow_all() -> dict[str, Any]:
    return {
        "ingress": [{"action": "Allow", "source": {}, "destination": {}}],
        "egress": [{"action": "Allow", "source": {}, "destination": {}}],
    }


class NamespaceProfileCodec(_ReadOnlyCodec):
    """A Namespace as Calico's `kns.<namespace>` Profile: allow all, and the namespace's
    labels to apply to its endpoints as `pcns.<label>`."""

    prefix = "kns."

    def revision(self, obj: dict[str, Any]) -> str:
        """Calico's profile revision is `<namespace's>/<service account's>`."""
        return f"{obj['metadata'].get('resourceVersion', '')}/"

    def name(self, key: ResourceKey) -> str:
        return key.name.removeprefix(self.prefix)

    def decode(self, obj: dict[str, Any]) -> Decoded:
        meta = obj["metadata"]
        labels = {f"pcns.{k}": v for k, v in (meta.get("labels") or {}).items()}
        labels["pcns.projectcalico.org/name"] = meta["name"]
        return self._profile(self.prefix + meta["name"], meta, labels)

    def _profile(self, name: str, meta: dict[str, Any], apply: dict[str, str]) -> Decoded:
        extra = {"uid": convert_uid(meta["uid"])} if meta.get("uid") else {}
        if meta.get("creationTimestamp"):
            extra["creationTimestamp"] = meta["creationTimestamp"]
        spec = {**_allow_all(), "labelsToApply": dict(sorted(apply.items()))}
        return Decoded(ResourceKey("Profile", name), Profile(ObjectMeta(name, {}, extra), spec))


class ServiceAccountProfileCodec(NamespaceProfileCodec):
    """A ServiceAccount as Calico's `ksa.<namespace>.<account>` Profile: no rules, the
    account's labels to apply as `pcsa.<label>`."""

    prefix = "ksa."

    def revision(self, obj: dict[str, Any]) -> str:
        return f"/{obj['metadata'].get('resourceVersion', '')}"

    def collection(self, key: Key | None = None) -> str:
        if isinstance(key, ResourceKey):
            namespace = key.name.removeprefix(self.prefix).split(".", 1)[0]
            return f"{self.root}/namespaces/{quote(namespace, safe='')}/serviceaccounts"
        return f"{self.root}/serviceaccounts"

    def path(self, key: Key) -> str:
        return f"{self.collection(key)}/{quote(self.name(key), safe='')}"

    def name(self, key: ResourceKey) -> str:
        rest = key.name.removeprefix(self.prefix)
        if "." not in rest:
            raise NotFound(f"{key.name} is not the name of a service account's profile")
        return rest.split(".", 1)[1]

    def decode(self, obj: dict[str, Any]) -> Decoded:
        meta = obj["metadata"]
        labels = {f"pcsa.{k}": v for k, v in (meta.get("labels") or {}).items()}
        labels["pcsa.projectcalico.org/name"] = meta["name"]
        name = f"{self.prefix}{meta['namespace']}.{meta['name']}"
        decoded = self._profile(name, meta, labels)
        decoded.value.spec = {"labelsToApply": decoded.value.spec["labelsToApply"]}
        return decoded


_BLOCKS = BlockCodec("IPAMBlock", "ipamblocks", two_step_delete=True)
_AFFINITIES = AffinityCodec("BlockAffinity", "blockaffinities", two_step_delete=True)
_HANDLES = HandleCodec("IPAMHandle", "ipamhandles", two_step_delete=True)
_IPAM_CONFIG = IPAMConfigCodec("IPAMConfig", "ipamconfigs")
_RESOURCES: dict[str, Codec] = {
    **{
        kind: ResourceCodec(kind, RESOURCE_PLURALS[kind])
        for kind in (
            "IPPool",
            "IPReservation",
            "ClusterInformation",
            "BGPPeer",
            "BGPConfiguration",
            "FelixConfiguration",
            "KubeControllersConfiguration",
            "GlobalNetworkPolicy",
            "GlobalNetworkSet",
            "Tier",
        )
    },
    **{
        kind: NamespacedResourceCodec(kind, RESOURCE_PLURALS[kind])
        for kind in ("NetworkPolicy", "NetworkSet")
    },
    "Node": NodeCodec("Node", RESOURCE_PLURALS["Node"], root="/api/v1"),
    "WorkloadEndpoint": WorkloadEndpointCodec("WorkloadEndpoint", "pods", root="/api/v1"),
}
_PROFILES = (
    NamespaceProfileCodec("Profile", "namespaces", root="/api/v1"),
    ServiceAccountProfileCodec("Profile", "serviceaccounts", root="/api/v1"),
)


def _resource_codecs(kind: str) -> tuple[Codec, ...]:
    if kind == "Profile":
        return _PROFILES
    try:
        return (_RESOURCES[kind],)
    except KeyError:
        raise DatastoreError(f"{kind} is not kept in the Kubernetes datastore") from None


def codec_for(key: Key) -> Codec:
    match key:
        case BlockKey():
            return _BLOCKS
        case BlockAffinityKey():
            return _AFFINITIES
        case HandleKey():
            return _HANDLES
        case IPAMConfigKey():
            return _IPAM_CONFIG
        case ResourceKey("Profile", name):
            codec = next((c for c in _PROFILES if name.startswith(c.prefix)), None)
            if codec is None:
                raise NotFound(f"Profile {name}: only kns.* and ksa.* profiles exist here")
            return codec
        case ResourceKey(kind, _):
            return _resource_codecs(kind)[0]
    raise TypeError(f"not a datastore key: {key!r}")


def _list_plan(options: ListOptions) -> tuple[tuple[Codec, ...], str]:
    """The codecs to list with and the label selector narrowing the list server-side."""
    match options:
        case BlockListOptions():
            return (_BLOCKS,), ""
        case BlockAffinityListOptions(host, version, affinity_type):
            labels = affinity_labels(host, affinity_type, version)
            return (_AFFINITIES,), ",".join(f"{k}={v}" for k, v in labels.items())
        case HandleListOptions():
            return (_HANDLES,), ""
        case ResourceListOptions(kind):
            return _resource_codecs(kind), ""
    raise TypeError(f"not list options: {options!r}")


def _selected(options: ListOptions, key: Key) -> bool:
    """Client-side filter on top of the label selector, as Calico's List also does."""
    match options, key:
        case BlockListOptions(version), BlockKey(cidr):
            return version in (None, cidr.version)
        case BlockAffinityListOptions(host, version, kind), BlockAffinityKey(h, cidr, t):
            return t == kind and host in (None, h) and version in (None, cidr.version)
    return True


# ----------------------------------------------------------------- backend


class KubernetesDatastore(Datastore):
    """The Datastore interface on Calico's CRDs through one API-server connection."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    @property
    def round_trips(self) -> int:
        """HTTP requests answered so far; tests and benches divide it by the CNI calls."""
        return self.client.round_trips

    def _decode(self, codec: Codec, obj: dict[str, Any]) -> KVPair:
        try:
            decoded = codec.decode(obj)
        except (KeyError, TypeError, ValueError) as err:
            name = (obj.get("metadata") or {}).get("name")
            raise DatastoreCorrupt(f"{codec.kind} {name!r} is not a Calico object: {err}") from err
        return KVPair(decoded.key, decoded.value, codec.revision(obj))

    @staticmethod
    def _marked_deleted(codec: Codec, kvp: KVPair) -> bool:
        return codec.two_step_delete and bool(kvp.value.deleted)

    def get(self, key: Key) -> KVPair:
        codec = codec_for(key)
        kvp = self._decode(codec, self.client.get(codec.path(key)))
        kvp.key = key
        if self._marked_deleted(codec, kvp):
            # A deleter stopped between its two steps: finish its delete (Calico does too).
            with contextlib.suppress(NotFound, Conflict):
                self.delete(kvp)
            raise NotFound(f"{codec.kind} {codec.name(key)} was deleted")
        return kvp

    def list(self, options: ListOptions) -> list[KVPair]:
        return self.list_versioned(options)[0]

    def list_versioned(self, options: ListOptions) -> tuple[list[KVPair], list[str]]:
        """The pairs, and for each collection `options` spans (watch_targets) the list's
        resourceVersion to watch it from (kubernetes_watch.py)."""
        codecs, selector = _list_plan(options)
        pairs = []
        versions = []
        for codec in codecs:
            version: list[str] = []
            for obj in self._list_objects(codec, selector, version):
                if not codec.selects(obj):
                    continue
                kvp = self._decode(codec, obj)
                if _selected(options, kvp.key) and not self._marked_deleted(codec, kvp):
                    pairs.append(kvp)
            versions.append(version[0] if version else "")
        return pairs, versions

    def watch_targets(self, options: ListOptions) -> list[tuple[str, str]]:
        """(collection path, label selector) of each collection `options` spans."""
        codecs, selector = _list_plan(options)
        return [(codec.collection(), selector) for codec in codecs]

    def decode_watched(
        self, options: ListOptions, target: int, obj: dict[str, Any]
    ) -> KVPair | None:
        """An object of watch target `target` as a pair (value None when it is marked
        deleted), or None when `options` does not select it."""
        codec = _list_plan(options)[0][target]
        if not codec.selects(obj):
            return None
        kvp = self._decode(codec, obj)
        if not _selected(options, kvp.key):
            return None
        if self._marked_deleted(codec, kvp):
            kvp.value = None
        return kvp

    def _list_objects(
        self, codec: Codec, selector: str, version: list[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every object of the collection, in pages (the API server's `continue` token);
        the first page's resourceVersion, the list's, is appended to `version`."""
        query = {"limit": str(LIST_PAGE)}
        if selector:
            query["labelSelector"] = selector
        while True:
            text = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
            page = self.client.get(codec.collection(), text)
            if version is not None and not version:
                version.append((page.get("metadata") or {}).get("resourceVersion") or "")
            yield from page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            query["continue"] = token

    def create(self, kvp: KVPair) -> KVPair:
        codec = codec_for(kvp.key)
        codec.check("Create")
        obj = codec.encode(kvp.key, kvp.value)
        created = self.client.request("POST", codec.collection(kvp.key), obj)
        return KVPair(kvp.key, kvp.value, created["metadata"]["resourceVersion"])

    def update(self, kvp: KVPair) -> KVPair:
        codec = codec_for(kvp.key)
        codec.check("Update")
        revision = kvp.revision
        if codec.merges:
            current = self.client.get(codec.path(kvp.key))
            obj = codec.merge(current, kvp.key, kvp.value)
            revision = revision or current["metadata"]["resourceVersion"]
        else:
            obj = codec.encode(kvp.key, kvp.value)
        if revision is None:
            revision = self.client.get(codec.path(kvp.key))["metadata"]["resourceVersion"]
        obj["metadata"]["resourceVersion"] = revision
        replaced = self.client.request("PUT", codec.update_path(kvp.key), obj)
        return KVPair(kvp.key, kvp.value, replaced["metadata"]["resourceVersion"])

    def delete(self, kvp: KVPair) -> None:
        codec = codec_for(kvp.key)
        codec.check("Delete")
        revision = kvp.revision
        if codec.two_step_delete:
            marked = dataclasses.replace(kvp.value, deleted=True)
            revision = self.update(KVPair(kvp.key, marked, revision)).revision
        options = None
        if revision is not None:
            options = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "preconditions": {"resourceVersion": revision},
            }
        self.client.request("DELETE", codec.path(kvp.key), options)

    def close(self) -> None:
        self.client.close()
