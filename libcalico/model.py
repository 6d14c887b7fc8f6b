"""Calico's IPAM and v3 objects, serialised exactly as Calico stores them in etcd v3.

Keys are frozen dataclasses so that each backend maps them to its own storage name with a
pure function (etcd path here via `key_path`; CRD object names in the Kubernetes backend).
Values convert to/from the etcd JSON documents (`to_json` / `from_json`).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

API_VERSION = "projectcalico.org/v3"
WINDOWS_RESERVED_HANDLE = "windows-reserved-ipam-handle"

STATE_PENDING = "pending"
STATE_CONFIRMED = "confirmed"
STATE_PENDING_DELETION = "pendingDeletion"


_NO_VALUE = object()


class ValidationError(ValueError):
    """A resource field with an invalid value; the message names the field (and the
    value, when one is given)."""

    def __init__(self, field_path: str, problem: str, value: Any = _NO_VALUE) -> None:
        self.field_path = field_path
        self.problem = problem
        self.shown = field_path if value is _NO_VALUE else f"{field_path} = '{value}'"
        super().__init__(f"{self.shown}: {problem}")


def parse_network(text: str, field_path: str = "cidr") -> IPNetwork:
    """Parse a CIDR leniently (host bits masked), as Calico's ParseCIDR does."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except (ValueError, TypeError) as err:
        raise ValidationError(field_path, f"{text!r} is not a valid CIDR") from err


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class BlockKey:
    """An IPAM block, by its CIDR."""

    cidr: IPNetwork


@dataclass(frozen=True)
class BlockAffinityKey:
    """A host's (or virtual owner's) claim on one block."""

    host: str
    cidr: IPNetwork
    affinity_type: str = "host"


@dataclass(frozen=True)
class HandleKey:
    """An IPAM handle: one workload's allocations."""

    handle_id: str


@dataclass(frozen=True)
class IPAMConfigKey:
    """The IPAM configuration singleton."""


@dataclass(frozen=True)
class ResourceKey:
    """A projectcalico.org/v3 resource, e.g. ResourceKey("IPPool", "default"); namespaced
    kinds (WorkloadEndpoint) also carry their namespace."""

    kind: str
    name: str
    namespace: str = ""


Key = BlockKey | BlockAffinityKey | HandleKey | IPAMConfigKey | ResourceKey

_IPAM_ROOT = "/calico/ipam/v2"
_RESOURCE_ROOT = "/calico/resources/v3/projectcalico.org"
RESOURCE_PLURALS = {
    "IPPool": "ippools",
    "IPReservation": "ipreservations",
    "Node": "nodes",
    "ClusterInformation": "clusterinformations",
    "WorkloadEndpoint": "workloadendpoints",
    "Profile": "profiles",
    "BGPPeer": "bgppeers",
    "BGPConfiguration": "bgpconfigurations",
    "FelixConfiguration": "felixconfigurations",
    "KubeControllersConfiguration": "kubecontrollersconfigurations",
    "NetworkPolicy": "networkpolicies",
    "GlobalNetworkPolicy": "globalnetworkpolicies",
    "NetworkSet": "networksets",
    "GlobalNetworkSet": "globalnetworksets",
    "Tier": "tiers",
}
NAMESPACED_KINDS = frozenset({"WorkloadEndpoint", "NetworkPolicy", "NetworkSet"})
_KIND_BY_PLURAL = {plural: kind for kind, plural in RESOURCE_PLURALS.items()}


def _cidr_segment(cidr: IPNetwork) -> str:
    return str(cidr).replace("/", "-")


def _parse_cidr_segment(segment: str) -> IPNetwork:
    address, _, prefix = segment.rpartition("-")
    return ipaddress.ip_network(f"{address}/{prefix}")


def key_path(key: Key) -> str:
    """Calico's etcd v3 key for `key` (calico-behaviour.md §4.7)."""
    match key:
        case BlockKey(cidr):
            return f"{_IPAM_ROOT}/assignment/ipv{cidr.version}/block/{_cidr_segment(cidr)}"
        case BlockAffinityKey(host, cidr, affinity_type):
            return (
                f"{_IPAM_ROOT}/{affinity_type}/{host}/ipv{cidr.version}/block/{_cidr_segment(cidr)}"
            )
        case HandleKey(handle_id):
            return f"{_IPAM_ROOT}/handle/{handle_id}"
        case IPAMConfigKey():
            return f"{_IPAM_ROOT}/config"
        case ResourceKey(kind, name, namespace) if kind in NAMESPACED_KINDS:
            return f"{_RESOURCE_ROOT}/{RESOURCE_PLURALS[kind]}/{namespace}/{name}"
        case ResourceKey(kind, name):
            return f"{_RESOURCE_ROOT}/{RESOURCE_PLURALS[kind]}/{name}"
    raise TypeError(f"not a datastore key: {key!r}")


def key_from_path(path: str) -> Key | None:
    """Inverse of `key_path`; None for paths that are not one of our keys."""
    if path.startswith(_RESOURCE_ROOT + "/"):
        plural, _, name = path[len(_RESOURCE_ROOT) + 1 :].partition("/")
        kind = _KIND_BY_PLURAL.get(plural)
        if kind in NAMESPACED_KINDS:
            namespace, _, name = name.partition("/")
            return (
                ResourceKey(kind, name, namespace)
                if namespace and name and "/" not in name
                else None
            )
        return ResourceKey(kind, name) if kind and name and "/" not in name else None
    if not path.startswith(_IPAM_ROOT + "/"):
        return None
    parts = path[len(_IPAM_ROOT) + 1 :].split("/")
    try:
        if parts == ["config"]:
            return IPAMConfigKey()
        if parts[0] == "handle" and len(parts) >= 2:
            return HandleKey("/".join(parts[1:]))
        if parts[0] == "assignment" and len(parts) == 4 and parts[2] == "block":
            return BlockKey(_parse_cidr_segment(parts[3]))
        if parts[0] in ("host", "virtual") and len(parts) == 5 and parts[3] == "block":
            return BlockAffinityKey(parts[1], _parse_cidr_segment(parts[4]), parts[0])
    except ValueError:
        return None
    return None


# ------------------------------------------------------------------- list options


@dataclass(frozen=True)
class BlockListOptions:
    """All blocks, or those of one IP version."""

    ip_version: int | None = None


@dataclass(frozen=True)
class BlockAffinityListOptions:
    """Affinities, optionally of one host and/or IP version."""

    host: str | None = None
    ip_version: int | None = None
    affinity_type: str = "host"


@dataclass(frozen=True)
class HandleListOptions:
    """Every handle."""


@dataclass(frozen=True)
class ResourceListOptions:
    """Every v3 resource of one kind."""

    kind: str


ListOptions = BlockListOptions | BlockAffinityListOptions | HandleListOptions | ResourceListOptions


def list_prefix(options: ListOptions) -> str:
    """The longest etcd key prefix covering every key `options` can match."""
    match options:
        case BlockListOptions(None):
            return f"{_IPAM_ROOT}/assignment/"
        case BlockListOptions(version):
            return f"{_IPAM_ROOT}/assignment/ipv{version}/block/"
        case BlockAffinityListOptions(None, _, affinity_type):
            return f"{_IPAM_ROOT}/{affinity_type}/"
        case BlockAffinityListOptions(host, None, affinity_type):
            return f"{_IPAM_ROOT}/{affinity_type}/{host}/"
        case BlockAffinityListOptions(host, version, affinity_type):
            return f"{_IPAM_ROOT}/{affinity_type}/{host}/ipv{version}/block/"
        case HandleListOptions():
            return f"{_IPAM_ROOT}/handle/"
        case ResourceListOptions(kind):
            return f"{_RESOURCE_ROOT}/{RESOURCE_PLURALS[kind]}/"
    raise TypeError(f"not list options: {options!r}")


def list_matches(options: ListOptions, key: Key | None) -> bool:
    """Whether `key` (parsed from a path under `list_prefix(options)`) is selected."""
    match options, key:
        case BlockListOptions(version), BlockKey(cidr):
            return version in (None, cidr.version)
        case BlockAffinityListOptions(host, version, kind), BlockAffinityKey(h, cidr, t):
            return t == kind and host in (None, h) and version in (None, cidr.version)
        case HandleListOptions(), HandleKey():
            return True
        case ResourceListOptions(kind), ResourceKey(k, _):
            return kind == k
    return False


# ------------------------------------------------------------------- IPAM values


@dataclass
class AllocationAttribute:
    """One `attributes` entry: the owner of some ordinals in a block."""

    handle_id: str | None
    secondary: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. alternateOwnerAttrs

    def to_json(self) -> dict[str, Any]:
        return {"handle_id": self.handle_id, "secondary": self.secondary, **self.extra}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AllocationAttribute:
        extra = {k: v for k, v in doc.items() if k not in ("handle_id", "secondary")}
        return cls(doc.get("handle_id"), dict(doc.get("secondary") or {}), extra)


def sanitize_handle_id(handle_id: str) -> str:
    """Cut at the first CR: old host-local migrations stored `<id>\\r\\neth0` (calico#3940)."""
    return handle_id.split("\r", 1)[0]


def host_affinity(host: str) -> str:
    return f"host:{host}"


@dataclass
class AllocationBlock:
    """An IPAM block (`model.AllocationBlock`): ordinals 0..N-1 of `cidr`."""

    cidr: IPNetwork
    affinity: str | None
    allocations: list[int | None]
    unallocated: list[int]
    attributes: list[AllocationAttribute]
    sequence_number: int
    sequence_number_for_allocation: dict[str, int] = field(default_factory=dict)
    affinity_claim_time: str | None = None
    deleted: bool = False

    @classmethod
    def new(
        cls, cidr: IPNetwork, affinity: str | None, claim_time: str, seq: int
    ) -> AllocationBlock:
        size = cidr.num_addresses
        return cls(cidr, affinity, [None] * size, list(range(size)), [], seq, {}, claim_time)

    # -- addresses

    def ip(self, ordinal: int) -> IPAddress:
        return self.cidr.network_address + ordinal

    def ordinal(self, ip: IPAddress) -> int:
        if ip not in self.cidr:
            raise ValueError(f"{ip} is not in block {self.cidr}")
        return int(ip) - int(self.cidr.network_address)

    def interface(self, ordinal: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """The address with the block's mask, as calico-ipam returns it."""
        return ipaddress.ip_interface(f"{self.ip(ordinal)}/{self.cidr.prefixlen}")

    # -- queries

    def handle_of(self, ordinal: int) -> str | None:
        index = self.allocations[ordinal]
        return None if index is None else self.attributes[index].handle_id

    def ordinals_for_handle(self, handle_id: str) -> list[int]:
        wanted = sanitize_handle_id(handle_id)
        return [
            o
            for o, index in enumerate(self.allocations)
            if index is not None
            and sanitize_handle_id(self.attributes[index].handle_id or "") == wanted
        ]

    def allocated_ordinals(self) -> list[int]:
        return [o for o, index in enumerate(self.allocations) if index is not None]

    def is_empty(self) -> bool:
        """Calico's notion: nothing allocated except Windows' reserved addresses."""
        return all(self.handle_of(o) == WINDOWS_RESERVED_HANDLE for o in self.allocated_ordinals())

    def free_ordinals(self, reserved: Reservations) -> list[int]:
        return [o for o in self.unallocated if not reserved.contains(self.ip(o))]

    # -- mutations (the caller writes the block back with CAS)

    def _attribute_index(self, handle_id: str, attrs: dict[str, str]) -> int:
        for index, existing in enumerate(self.attributes):
            if (
                existing.handle_id == handle_id
                and existing.secondary == attrs
                and not existing.extra
            ):
                return index
        self.attributes.append(AllocationAttribute(handle_id, dict(attrs)))
        return len(self.attributes) - 1

    def _allocate(self, ordinals: list[int], handle_id: str, attrs: dict[str, str]) -> None:
        index = self._attribute_index(handle_id, attrs)
        taken = set(ordinals)
        for ordinal in ordinals:
            self.allocations[ordinal] = index
            self.sequence_number_for_allocation[str(ordinal)] = self.sequence_number
        self.unallocated = [o for o in self.unallocated if o not in taken]

    def auto_assign(
        self, num: int, handle_id: str, attrs: dict[str, str], reserved: Reservations
    ) -> list[int]:
        """Take up to `num` free ordinals in FIFO order, skipping reserved addresses."""
        chosen = self.free_ordinals(reserved)[:num]
        if chosen:
            self._allocate(chosen, handle_id, attrs)
        return chosen

    def assign(self, ordinal: int, handle_id: str, attrs: dict[str, str]) -> None:
        if self.allocations[ordinal] is not None:
            raise AddressInUse("Address already assigned in block")
        self._allocate([ordinal], handle_id, attrs)

    def release(self, ordinals: list[int]) -> None:
        """Free ordinals: appended to the end of `unallocated` so they are reused last."""
        for ordinal in ordinals:
            if self.allocations[ordinal] is None:
                continue
            self.allocations[ordinal] = None
            self.unallocated.append(ordinal)
            self.sequence_number_for_allocation.pop(str(ordinal), None)
        self._compact_attributes()

    def _compact_attributes(self) -> None:
        used = sorted({i for i in self.allocations if i is not None})
        remap = {old: new for new, old in enumerate(used)}
        self.attributes = [self.attributes[old] for old in used]
        self.allocations = [None if i is None else remap[i] for i in self.allocations]

    # -- JSON

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"cidr": str(self.cidr), "affinity": self.affinity}
        if self.affinity_claim_time:
            doc["affinity_claim_time"] = self.affinity_claim_time
        doc.update(
            allocations=self.allocations,
            unallocated=self.unallocated,
            attributes=[a.to_json() for a in self.attributes],
            deleted=self.deleted,
            sequenceNumber=self.sequence_number,
            sequenceNumberForAllocation=self.sequence_number_for_allocation,
        )
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AllocationBlock:
        return cls(
            cidr=ipaddress.ip_network(doc["cidr"]),
            affinity=doc.get("affinity") or doc.get("hostAffinity"),
            allocations=list(doc.get("allocations") or []),
            unallocated=list(doc.get("unallocated") or []),
            attributes=[AllocationAttribute.from_json(a) for a in doc.get("attributes") or []],
            sequence_number=int(doc.get("sequenceNumber") or 0),
            sequence_number_for_allocation={
                str(k): int(v) for k, v in (doc.get("sequenceNumberForAllocation") or {}).items()
            },
            affinity_claim_time=doc.get("affinity_claim_time"),
            deleted=bool(doc.get("deleted", False)),
        )


class AddressInUse(Exception):
    """The ordinal asked for is already allocated."""


@dataclass
class BlockAffinity:
    """The value of a BlockAffinityKey: claim state (pending → confirmed)."""

    state: str = STATE_CONFIRMED
    deleted: bool = False

    def is_confirmed(self) -> bool:
        """An empty state comes from old releases and means confirmed."""
        return self.state in ("", STATE_CONFIRMED)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "deleted": self.deleted}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BlockAffinity:
        return cls(doc.get("state") or "", bool(doc.get("deleted", False)))


@dataclass
class IPAMHandle:
    """Per-block allocation counts of one handle; the ID lives only in the key."""

    block: dict[str, int] = field(default_factory=dict)
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "deleted": self.deleted}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IPAMHandle:
        block = {str(k): int(v) for k, v in (doc.get("block") or {}).items()}
        return cls(block, bool(doc.get("deleted", False)))


@dataclass
class IPAMConfig:
    """The `/calico/ipam/v2/config` singleton; `IPAMConfig()` is Calico's default."""

    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # Go's omitempty drops false/zero fields.
        doc: dict[str, Any] = dict(self.extra)
        if self.strict_affinity:
            doc["strict_affinity"] = True
        if self.auto_allocate_blocks:
            doc["auto_allocate_blocks"] = True
        if self.max_blocks_per_host:
            doc["maxBlocksPerHost"] = self.max_blocks_per_host
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IPAMConfig:
        known = ("strict_affinity", "auto_allocate_blocks", "maxBlocksPerHost")
        return cls(
            strict_affinity=bool(doc.get("strict_affinity", False)),
            auto_allocate_blocks=bool(doc.get("auto_allocate_blocks", False)),
            max_blocks_per_host=int(doc.get("maxBlocksPerHost") or 0),
            extra={k: v for k, v in doc.items() if k not in known},
        )


# ------------------------------------------------------------- v3 resources


# Go's ObjectMeta fields, in its order: how Calico's JSON (and calicoctl's -o json) lists
# metadata.
METADATA_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)


def ordered_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc`'s keys in Go's ObjectMeta order (unknown ones last)."""
    rank = {name: index for index, name in enumerate(METADATA_FIELDS)}
    return dict(sorted(doc.items(), key=lambda item: rank.get(item[0], len(rank))))


@dataclass
class ObjectMeta:
    """v3 resource metadata; fields IPAM does not use are kept verbatim."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # uid, creationTimestamp, ...

    @property
    def namespace(self) -> str:
        return str(self.extra.get("namespace") or "")

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.extra.get("annotations") or {})

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, **self.extra}
        if self.labels:
            doc["labels"] = self.labels
        return ordered_metadata(doc)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ObjectMeta:
        name = doc.get("name")
        if not isinstance(name, str) or not name:
            raise ValidationError("metadata.name", "must be a non-empty string")
        extra = {k: v for k, v in doc.items() if k not in ("name", "labels")}
        return cls(name, dict(doc.get("labels") or {}), extra)


def _envelope(kind: str, metadata: ObjectMeta, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "apiVersion": API_VERSION, "metadata": metadata.to_json(), "spec": spec}


def _typed(spec: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = spec.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValidationError(f"spec.{name}", f"has the wrong type ({value!r})")
    return value


ENCAP_MODES = ("Never", "Always", "CrossSubnet")
ALLOWED_USES = ("Workload", "Tunnel", "LoadBalancer")
ASSIGNMENT_MODES = ("Automatic", "Manual")


@dataclass
class IPPoolSpec:
    """IPPool spec with Calico's defaults (blockSize 26 / 122, nodeSelector all())."""

    cidr: str
    block_size: int
    ipip_mode: str = "Never"
    vxlan_mode: str = "Never"
    nat_outgoing: bool = False
    disabled: bool = False
    disable_bgp_export: bool = False
    node_selector: str = "all()"
    namespace_selector: str = ""
    allowed_uses: list[str] = field(default_factory=lambda: ["Workload", "Tunnel"])
    assignment_mode: str = "Automatic"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "cidr": self.cidr,
            "vxlanMode": self.vxlan_mode,
            "ipipMode": self.ipip_mode,
            "natOutgoing": self.nat_outgoing,
            "disabled": self.disabled,
            "disableBGPExport": self.disable_bgp_export,
            "blockSize": self.block_size,
            "nodeSelector": self.node_selector,
            "namespaceSelector": self.namespace_selector,
            "allowedUses": self.allowed_uses,
            "assignmentMode": self.assignment_mode,
        }
        return {k: v for k, v in doc.items() if v or k == "cidr"}  # Go omitempty

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> IPPoolSpec:
        cidr = _typed(spec, "cidr", str, "")
        if not cidr:
            raise ValidationError("spec.cidr", "is required")
        default_block = 26 if ":" not in cidr else 122
        return cls(
            cidr=cidr,
            block_size=_typed(spec, "blockSize", int, 0) or default_block,
            ipip_mode=_typed(spec, "ipipMode", str, "") or "Never",
            vxlan_mode=_typed(spec, "vxlanMode", str, "") or "Never",
            nat_outgoing=_typed(spec, "natOutgoing", bool, False),
            disabled=_typed(spec, "disabled", bool, False),
            disable_bgp_export=_typed(spec, "disableBGPExport", bool, False),
            node_selector=_typed(spec, "nodeSelector", str, "") or "all()",
            namespace_selector=_typed(spec, "namespaceSelector", str, ""),
            allowed_uses=list(_typed(spec, "allowedUses", list, []) or ["Workload", "Tunnel"]),
            assignment_mode=_typed(spec, "assignmentMode", str, "") or "Automatic",
        )


@dataclass
class IPPool:
    """A projectcalico.org/v3 IPPool."""

    metadata: ObjectMeta
    spec: IPPoolSpec
    status: dict[str, Any] | None = None

    kind = "IPPool"

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def network(self) -> IPNetwork:
        return parse_network(self.spec.cidr, "spec.cidr")

    def is_enabled(self) -> bool:
        """Usable for new allocations: not disabled, not being deleted, not unallocatable."""
        if self.spec.disabled or "deletionTimestamp" in self.metadata.extra:
            return False
        conditions = (self.status or {}).get("conditions") or []
        return not any(
            c.get("type") == "Allocatable" and c.get("status") == "False" for c in conditions
        )

    def validate(self) -> None:
        """Refuse what Calico's validator refuses; ValidationError names the field, its
        value and the reason in Calico's words."""
        from libcalico.selector import SelectorError, parse_selector

        spec = self.spec

        def invalid(name: str, value: Any, reason: str) -> ValidationError:
            return ValidationError(f"spec.{name}", reason, value)

        try:
            network = ipaddress.ip_network(spec.cidr)
        except ValueError as err:
            try:
                ipaddress.ip_network(spec.cidr, strict=False)
                reason = "IP pool CIDR is not strictly masked"
            except ValueError:
                reason = "IPPool CIDR must be a valid subnet"
            raise invalid("cidr", spec.cidr, reason) from err
        low, high = (20, 32) if network.version == 4 else (116, 128)
        if not low <= spec.block_size <= high:
            raise invalid(
                "blockSize",
                spec.block_size,
                f"block size must be between {low} and {high} for an IPv{network.version} pool",
            )
        if spec.block_size < network.prefixlen:
            raise invalid(
                "cidr",
                spec.cidr,
                "IP pool size is too small for use with Calico IPAM. It must be equal to or "
                "greater than the block size.",
            )
        for name, value, allowed in (
            ("ipipMode", spec.ipip_mode, ENCAP_MODES),
            ("vxlanMode", spec.vxlan_mode, ENCAP_MODES),
            ("assignmentMode", spec.assignment_mode, ASSIGNMENT_MODES),
        ):
            if value not in allowed:
                raise invalid(name, value, f"must be one of {', '.join(allowed)}")
        if spec.ipip_mode != "Never" and spec.vxlan_mode != "Never":
            raise invalid(
                "ipipMode", spec.ipip_mode, "IPIPMode and VXLANMode cannot both be enabled"
            )
        if network.version == 6 and spec.ipip_mode != "Never":
            raise invalid(
                "ipipMode",
                spec.ipip_mode,
                "IPIPMode other than 'Never' is not supported on an IPv6 IP pool",
            )
        for use in spec.allowed_uses:
            if use not in ALLOWED_USES:
                raise invalid("allowedUses", use, f"must be one of {', '.join(ALLOWED_USES)}")
        for name, selector in (
            ("nodeSelector", spec.node_selector),
            ("namespaceSelector", spec.namespace_selector),
        ):
            try:
                parse_selector(selector)
            except SelectorError as err:
                raise invalid(name, selector, f"invalid selector: {err}") from err

    def to_json(self) -> dict[str, Any]:
        doc = _envelope(self.kind, self.metadata, self.spec.to_json())
        if self.status:
            doc["status"] = self.status
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IPPool:
        return cls(
            ObjectMeta.from_json(doc.get("metadata") or {}),
            IPPoolSpec.from_json(doc.get("spec") or {}),
            doc.get("status"),
        )


@dataclass
class IPReservation:
    """Addresses auto-assign must never hand out."""

    metadata: ObjectMeta
    reserved_cidrs: list[str] = field(default_factory=list)

    kind = "IPReservation"

    def to_json(self) -> dict[str, Any]:
        return _envelope(self.kind, self.metadata, {"reservedCIDRs": self.reserved_cidrs})

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IPReservation:
        spec = doc.get("spec") or {}
        return cls(
            ObjectMeta.from_json(doc.get("metadata") or {}),
            list(_typed(spec, "reservedCIDRs", list, [])),
        )


@dataclass
class SpecResource:
    """A v3 resource whose spec is kept as Calico's JSON dict: each reader takes what it
    needs, and fields this code does not know survive a read-modify-write."""

    metadata: ObjectMeta
    spec: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] | None = None

    kind: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """The stored form (etcd's JSON)."""
        return self.api_json()

    def api_json(self) -> dict[str, Any]:
        """The projectcalico.org/v3 document an operator writes and calicoctl prints."""
        doc = _envelope(self.kind, self.metadata, self.spec)
        if self.status is not None:
            doc["status"] = self.status
        return doc

    @property
    def storage_name(self) -> str:
        """The name the datastore key carries."""
        return self.metadata.name

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        """From the stored form."""
        return cls.from_api(doc)

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> Self:
        """From a projectcalico.org/v3 document."""
        status = doc.get("status")
        return cls(
            ObjectMeta.from_json(doc.get("metadata") or {}),
            dict(doc.get("spec") or {}),
            dict(status) if isinstance(status, dict) else None,
        )


# The tunnel addresses IPAM gives a node's own devices: the `type` attribute of their
# allocation, and where Node.spec records the address (IPIP v4, VXLAN v4/v6, WireGuard
# v4/v6), as calico-node's allocateip and Calico's IPAM name them.
TUNNEL_ADDRESS_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ipipTunnelAddress", ("bgp", "ipv4IPIPTunnelAddr")),
    ("vxlanTunnelAddress", ("ipv4VXLANTunnelAddr",)),
    ("vxlanV6TunnelAddress", ("ipv6VXLANTunnelAddr",)),
    ("wireguardTunnelAddress", ("wireguard", "interfaceIPv4Address")),
    ("wireguardV6TunnelAddress", ("wireguard", "interfaceIPv6Address")),
)


class Node(SpecResource):
    """A Calico Node: `spec.bgp` (ipv4Address with its prefix, asNumber,
    routeReflectorClusterID), tunnel addresses; IPAM needs its existence and labels.
    Its status is always present (`{}` when empty), as Calico stores it."""

    kind = "Node"

    def api_json(self) -> dict[str, Any]:
        doc = super().api_json()
        doc.setdefault("status", {})
        return doc

    def tunnel_addresses(self) -> list[str]:
        """The addresses IPAM gave this node's own devices (IPIP, VXLAN, WireGuard)."""
        found = []
        for _, path in TUNNEL_ADDRESS_FIELDS:
            spec = self.spec
            for name in path[:-1]:
                spec = spec.get(name) or {}
            found.append(spec.get(path[-1]))
        return [text.split("/", 1)[0] for text in found if text]


class ClusterInformation(SpecResource):
    """Cluster-wide facts (datastoreReady, clusterGUID, ...)."""

    kind = "ClusterInformation"


class WorkloadEndpoint(SpecResource):
    """What the calico plugin records per pod interface (namespaced; etcd mode)."""

    kind = "WorkloadEndpoint"

    def addresses(self) -> list[str]:
        """The IPs of spec.ipNetworks, without their prefix length."""
        return [network.split("/", 1)[0] for network in self.spec.get("ipNetworks") or []]


class Profile(SpecResource):
    """Policy attached to endpoints; the plugin creates one per network without k8s policy."""

    kind = "Profile"


class BGPPeer(SpecResource):
    """A BGP peering: `peerIP` + `asNumber`, or `peerSelector`; for all nodes or those of
    `node` / `nodeSelector`."""

    kind = "BGPPeer"


class BGPConfiguration(SpecResource):
    """BGP settings, cluster-wide (`default`) or per node (`node.<name>`): the mesh, the
    AS number, log severity, listen port, ..."""

    kind = "BGPConfiguration"


class FelixConfiguration(SpecResource):
    """Dataplane settings, cluster-wide (`default`) or per node (`node.<name>`)."""

    kind = "FelixConfiguration"


class KubeControllersConfiguration(SpecResource):
    """Settings of the controllers (IPAM garbage collection among them)."""

    kind = "KubeControllersConfiguration"


class Tier(SpecResource):
    """An ordered group of policies (`default` holds those without a tier)."""

    kind = "Tier"


DEFAULT_TIER = "default"
TIER_LABEL = "projectcalico.org/tier"
# Where Calico keeps metadata its storage cannot hold as is: the v3 name of a policy
# stored under its tiered name (etcd), all v3 metadata of a CRD (Kubernetes).
METADATA_ANNOTATION = "projectcalico.org/metadata"


def tiered_policy_name(name: str) -> str:
    """The name a policy is stored under: `x` in the default tier is `default.x`; a name
    with a dot already names its tier (libcalico-go's names.TieredPolicyName)."""
    return name if "." in name else f"{DEFAULT_TIER}.{name}"


class _TieredPolicy(SpecResource):
    """A policy, stored under its tiered name with the v3 name in an annotation, read back
    with its tier in `spec.tier` and the `projectcalico.org/tier` label, as Calico does."""

    @property
    def tier(self) -> str:
        return str(self.spec.get("tier") or DEFAULT_TIER)

    @property
    def storage_name(self) -> str:
        return tiered_policy_name(self.metadata.name)

    def to_json(self) -> dict[str, Any]:
        doc = self.api_json()
        meta = doc["metadata"]
        meta["name"] = self.storage_name
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != TIER_LABEL}
        meta.pop("labels", None)
        if labels:
            meta["labels"] = labels
        stash = json.dumps({"name": self.metadata.name}, separators=(",", ":"))
        meta["annotations"] = {**(meta.get("annotations") or {}), METADATA_ANNOTATION: stash}
        if self.tier == DEFAULT_TIER:
            doc["spec"] = {k: v for k, v in doc["spec"].items() if k != "tier"}
        doc["metadata"] = ordered_metadata(meta)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Self:
        meta = dict(doc.get("metadata") or {})
        annotations = dict(meta.get("annotations") or {})
        stash = annotations.pop(METADATA_ANNOTATION, None)
        stored = str(meta.get("name") or "")
        name = json.loads(stash).get("name") if stash else None
        meta["name"] = name or stored.removeprefix(f"{DEFAULT_TIER}.")
        meta.pop("annotations", None)
        if annotations:
            meta["annotations"] = annotations
        return cls.from_api({**doc, "metadata": meta})

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> Self:
        policy = super().from_api(doc)
        tier = policy.tier
        policy.spec["tier"] = tier
        policy.metadata.labels[TIER_LABEL] = tier
        return policy


class NetworkPolicy(_TieredPolicy):
    """Namespaced policy; stored and validated (enforcement is not implemented)."""

    kind = "NetworkPolicy"


class GlobalNetworkPolicy(_TieredPolicy):
    """Cluster-wide policy; stored and validated (enforcement is not implemented)."""

    kind = "GlobalNetworkPolicy"


class NetworkSet(SpecResource):
    """Namespaced set of networks that policy selectors can match."""

    kind = "NetworkSet"


class GlobalNetworkSet(SpecResource):
    """Cluster-wide set of networks that policy selectors can match."""

    kind = "GlobalNetworkSet"


Resource = IPPool | IPReservation | SpecResource
RESOURCE_TYPES: dict[str, type[Resource]] = {
    cls.kind: cls
    for cls in (
        IPPool,
        IPReservation,
        Node,
        ClusterInformation,
        WorkloadEndpoint,
        Profile,
        BGPPeer,
        BGPConfiguration,
        FelixConfiguration,
        KubeControllersConfiguration,
        NetworkPolicy,
        GlobalNetworkPolicy,
        NetworkSet,
        GlobalNetworkSet,
        Tier,
    )
}
Value = AllocationBlock | BlockAffinity | IPAMHandle | IPAMConfig | Resource


def api_document(resource: Resource) -> dict[str, Any]:
    """The v3 document of a resource (IPPool and IPReservation store exactly that)."""
    return resource.api_json() if isinstance(resource, SpecResource) else resource.to_json()


def resource_from_api(kind: str, doc: dict[str, Any]) -> Resource:
    cls = RESOURCE_TYPES[kind]
    return cls.from_api(doc) if issubclass(cls, SpecResource) else cls.from_json(doc)


def resource_key(resource: Resource) -> ResourceKey:
    """Where `resource` is stored: its kind, its storage name and (namespaced) namespace."""
    name = resource.storage_name if isinstance(resource, SpecResource) else resource.metadata.name
    namespace = resource.metadata.namespace if resource.kind in NAMESPACED_KINDS else ""
    return ResourceKey(resource.kind, name, namespace)


@dataclass(frozen=True)
class Reservations:
    """IPReservation CIDRs of one family; auto-assign never hands these out."""

    networks: tuple[IPNetwork, ...] = ()

    def contains(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks)

    def covers(self, cidr: IPNetwork) -> bool:
        return any(
            cidr.version == net.version and cidr.subnet_of(net)  # type: ignore[arg-type]
            for net in self.networks
        )


# ------------------------------------------------------------ (de)serialisation


def encode_value(value: Value) -> str:
    """Compact JSON, the way Calico writes etcd values."""
    return json.dumps(value.to_json(), separators=(",", ":"))


def decode_value(key: Key, text: str) -> Value:
    """Parse the etcd JSON of the object stored under `key`."""
    doc = json.loads(text)
    match key:
        case BlockKey():
            return AllocationBlock.from_json(doc)
        case BlockAffinityKey():
            return BlockAffinity.from_json(doc)
        case HandleKey():
            return IPAMHandle.from_json(doc)
        case IPAMConfigKey():
            return IPAMConfig.from_json(doc)
        case ResourceKey(kind, _):
            return RESOURCE_TYPES[kind].from_json(doc)
    raise TypeError(f"not a datastore key: {key!r}")
