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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
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
    ResourceKey,
    ResourceListOptions,
    Value,
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

    def collection(self) -> str:
        return f"{self.root}/{self.plural}"

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


class ResourceCodec(Codec):
    """Cluster-scoped v3 resources (IPPool, BGPPeer, ...): the v3 document with the CRD's
    apiVersion."""

    def name(self, key: ResourceKey) -> str:
        return key.name

    def encode(self, key: ResourceKey, value: Value) -> dict[str, Any]:
        doc = value.to_json()
        doc["apiVersion"] = GROUP_VERSION
        doc.pop("status", None)  # the status subresource is not ours to write
        doc["metadata"] = _metadata(doc)
        return doc

    def decode(self, obj: dict[str, Any]) -> Decoded:
        doc = dict(obj, metadata=_metadata(obj))
        value = RESOURCE_TYPES[self.kind].from_json(doc)
        return Decoded(ResourceKey(self.kind, value.metadata.name), value)


class NodeCodec(Codec):
    """The cluster's Nodes, read-only: IPAM needs their names and labels."""

    def name(self, key: ResourceKey) -> str:
        return key.name

    def encode(self, key: Key, value: Value) -> dict[str, Any]:
        raise DatastoreError(
            "Nodes in the Kubernetes datastore are the cluster's own Nodes: "
            "kubelet registers them, the CNI plugin never writes them"
        )

    def decode(self, obj: dict[str, Any]) -> Decoded:
        metadata = obj["metadata"]
        node = Node(ObjectMeta(metadata["name"], dict(metadata.get("labels") or {})))
        return Decoded(ResourceKey("Node", node.metadata.name), node)


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
        )
    },
    "Node": NodeCodec("Node", RESOURCE_PLURALS["Node"], root="/api/v1"),
}


def _resource_codec(kind: str) -> Codec:
    try:
        return _RESOURCES[kind]
    except KeyError:
        raise DatastoreError(
            f"{kind} is not kept in the Kubernetes datastore (the Pod is the workload endpoint)"
        ) from None


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
        case ResourceKey(kind, _):
            return _resource_codec(kind)
    raise TypeError(f"not a datastore key: {key!r}")


def _list_plan(options: ListOptions) -> tuple[Codec, str]:
    """The codec to list with and the label selector narrowing the list server-side."""
    match options:
        case BlockListOptions():
            return _BLOCKS, ""
        case BlockAffinityListOptions(host, version, affinity_type):
            labels = affinity_labels(host, affinity_type, version)
            return _AFFINITIES, ",".join(f"{k}={v}" for k, v in labels.items())
        case HandleListOptions():
            return _HANDLES, ""
        case ResourceListOptions(kind):
            return _resource_codec(kind), ""
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
        return KVPair(decoded.key, decoded.value, obj["metadata"].get("resourceVersion"))

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

    def list_versioned(self, options: ListOptions) -> tuple[list[KVPair], str]:
        """The pairs, and the collection's resourceVersion to watch from (watch.py)."""
        codec, selector = _list_plan(options)
        pairs = []
        version: list[str] = []
        for obj in self._list_objects(codec, selector, version):
            kvp = self._decode(codec, obj)
            if _selected(options, kvp.key) and not self._marked_deleted(codec, kvp):
                pairs.append(kvp)
        return pairs, version[0] if version else ""

    def watch_target(self, options: ListOptions) -> tuple[str, str]:
        """(collection path, label selector) a watch of `options` follows."""
        codec, selector = _list_plan(options)
        return codec.collection(), selector

    def decode_watched(self, options: ListOptions, obj: dict[str, Any]) -> KVPair | None:
        """A watched object as a pair (value None when it is marked deleted), or None when
        `options` does not select it."""
        codec = _list_plan(options)[0]
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
        created = self.client.request("POST", codec.collection(), codec.encode(kvp.key, kvp.value))
        return KVPair(kvp.key, kvp.value, created["metadata"]["resourceVersion"])

    def update(self, kvp: KVPair) -> KVPair:
        codec = codec_for(kvp.key)
        obj = codec.encode(kvp.key, kvp.value)
        revision = kvp.revision
        if revision is None:
            revision = self.client.get(codec.path(kvp.key))["metadata"]["resourceVersion"]
        obj["metadata"]["resourceVersion"] = revision
        replaced = self.client.request("PUT", codec.path(kvp.key), obj)
        return KVPair(kvp.key, kvp.value, replaced["metadata"]["resourceVersion"])

    def delete(self, kvp: KVPair) -> None:
        codec = codec_for(kvp.key)
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
