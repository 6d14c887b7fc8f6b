"""The projectcalico.org/v3 resources `ctl` manages: IPPool, IPReservation,
IPAMConfiguration and ClusterInformation, parsed from an operator's documents and
checked field by field.

Checks here need nothing but the document; the rules that compare against what is
stored (overlap, immutable fields) live in `store`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from calicoctl.errors import CommandError
from libcalico.model import (
    API_VERSION,
    ClusterInformation,
    IPAMConfig,
    IPPool,
    IPReservation,
    ObjectMeta,
    ValidationError,
    _typed,
)

IPPOOL = "IPPool"
IPRESERVATION = "IPReservation"
IPAMCONFIGURATION = "IPAMConfiguration"
IPAM_CONFIG_NAME = "default"
CLUSTERINFORMATION = "ClusterInformation"
CLUSTER_INFORMATION_NAME = "default"

# What an operator may type on the command line (case-insensitive), as calicoctl accepts.
_KIND_ALIASES = {
    IPPOOL: ("ippool", "ippools", "ipp", "ipps", "pool", "pools"),
    IPRESERVATION: ("ipreservation", "ipreservations", "ipr", "iprs"),
    IPAMCONFIGURATION: (
        "ipamconfiguration",
        "ipamconfigurations",
        "ipamconfig",
        "ipamconfigs",
    ),
    CLUSTERINFORMATION: (
        "clusterinformation",
        "clusterinformations",
        "clusterinfo",
        "clusterinfos",
    ),
}
_KIND_BY_ALIAS = {alias: kind for kind, aliases in _KIND_ALIASES.items() for alias in aliases}
# `kind:` in a document; IPAMConfig is the CRD's name for the same singleton.
_DOCUMENT_KINDS = {
    IPPOOL: IPPOOL,
    IPRESERVATION: IPRESERVATION,
    IPAMCONFIGURATION: IPAMCONFIGURATION,
    "IPAMConfig": IPAMCONFIGURATION,
    CLUSTERINFORMATION: CLUSTERINFORMATION,
}

_TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_SPEC_FIELDS = {
    IPPOOL: (
        "cidr",
        "blockSize",
        "ipipMode",
        "vxlanMode",
        "natOutgoing",
        "disabled",
        "disableBGPExport",
        "nodeSelector",
        "namespaceSelector",
        "allowedUses",
        "assignmentMode",
    ),
    IPRESERVATION: ("reservedCIDRs",),
    IPAMCONFIGURATION: (
        "strictAffinity",
        "autoAllocateBlocks",
        "maxBlocksPerHost",
        "ipCooldownSeconds",
        "kubeVirtVMAddressPersistence",
    ),
}
# ClusterInformationSpec (api/pkg/apis/projectcalico/v3/clusterinfo.go): field -> type.
# `variant` is not in the task's list but is a real field calico/node writes, so that
# what `get -o yaml` prints from a real cluster applies back.
_CLUSTER_INFORMATION_SPEC: dict[str, type] = {
    "clusterGUID": str,
    "clusterType": str,
    "calicoVersion": str,
    "datastoreReady": bool,
    "variant": str,
}
_SPEC_FIELDS[CLUSTERINFORMATION] = tuple(_CLUSTER_INFORMATION_SPEC)
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_IP_COOLDOWN_SECONDS = 1200
VM_ADDRESS_PERSISTENCE = ("Enabled", "Disabled")


@dataclass
class IPAMConfiguration:
    """The v3 view of the IPAM configuration singleton, stored as Calico's IPAMConfig."""

    metadata: ObjectMeta
    config: IPAMConfig

    kind = IPAMCONFIGURATION

    def to_json(self) -> dict[str, Any]:
        spec = {
            "strictAffinity": self.config.strict_affinity,
            "autoAllocateBlocks": self.config.auto_allocate_blocks,
            "maxBlocksPerHost": self.config.max_blocks_per_host,
            **self.config.extra,
        }
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": self.metadata.to_json(),
            "spec": spec,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IPAMConfiguration:
        spec = doc.get("spec") or {}
        extra = {
            name: spec[name]
            for name in ("ipCooldownSeconds", "kubeVirtVMAddressPersistence")
            if name in spec
        }
        config = IPAMConfig(
            strict_affinity=_typed(spec, "strictAffinity", bool, False),
            auto_allocate_blocks=_typed(spec, "autoAllocateBlocks", bool, True),
            max_blocks_per_host=_typed(spec, "maxBlocksPerHost", int, 0),
            extra=extra,
        )
        return cls(ObjectMeta.from_json(doc.get("metadata") or {}), config)

    def validate(self) -> None:
        """libcalico-go's rules for SetIPAMConfig, plus the v3 validator's ranges."""
        config = self.config
        if self.metadata.name != IPAM_CONFIG_NAME:
            raise ValidationError(
                "metadata.name", f'must be "{IPAM_CONFIG_NAME}": the IPAM configuration is one'
            )
        if config.max_blocks_per_host < 0:
            raise ValidationError("spec.maxBlocksPerHost", "must not be negative")
        if not config.strict_affinity and not config.auto_allocate_blocks:
            raise ValidationError(
                "spec.autoAllocateBlocks",
                "cannot be false while strictAffinity is false (no address could be assigned)",
            )
        if config.max_blocks_per_host > 0 and not config.strict_affinity:
            raise ValidationError(
                "spec.maxBlocksPerHost", "can only be set when strictAffinity is true"
            )
        cooldown = _typed(config.extra, "ipCooldownSeconds", int, 0)
        if not 0 <= cooldown <= MAX_IP_COOLDOWN_SECONDS:
            raise ValidationError(
                "spec.ipCooldownSeconds", f"must be between 0 and {MAX_IP_COOLDOWN_SECONDS}"
            )
        persistence = config.extra.get("kubeVirtVMAddressPersistence")
        if persistence is not None and persistence not in VM_ADDRESS_PERSISTENCE:
            raise ValidationError(
                "spec.kubeVirtVMAddressPersistence",
                f"{persistence!r} is not one of {', '.join(VM_ADDRESS_PERSISTENCE)}",
            )


def cluster_information_from_json(doc: dict[str, Any]) -> ClusterInformation:
    """ClusterInformation with its spec type-checked; unset (null) and empty-string
    fields are dropped, as Go's `omitempty` drops them when Calico stores the resource."""
    info = ClusterInformation.from_json(doc)
    spec = {}
    for name, kind in _CLUSTER_INFORMATION_SPEC.items():
        value = _typed(info.spec, name, kind, None)
        if value is not None and value != "":
            spec[name] = value
    info.spec = spec
    return info


def _validate_cluster_information(info: ClusterInformation) -> None:
    """libcalico-go refuses any name but `default`; the spec fields must have their types."""
    if info.metadata.name != CLUSTER_INFORMATION_NAME:
        raise ValidationError(
            "metadata.name",
            f'must be "{CLUSTER_INFORMATION_NAME}": the cluster information is one',
        )
    for name in info.spec:
        if name not in _CLUSTER_INFORMATION_SPEC:
            raise ValidationError(f"spec.{name}", f"unknown field for {CLUSTERINFORMATION}")
        _typed(info.spec, name, _CLUSTER_INFORMATION_SPEC[name], None)


CtlResource = IPPool | IPReservation | IPAMConfiguration | ClusterInformation
_PARSERS: dict[str, Callable[[dict[str, Any]], CtlResource]] = {
    IPPOOL: IPPool.from_json,
    IPRESERVATION: IPReservation.from_json,
    IPAMCONFIGURATION: IPAMConfiguration.from_json,
    CLUSTERINFORMATION: cluster_information_from_json,
}


def canonical_kind(text: str) -> str:
    """The kind an operator means by `ippools`, `ipp`, `IPAMConfig`, ..."""
    kind = _KIND_BY_ALIAS.get(text.lower())
    if kind is None:
        raise CommandError(
            f'resource type "{text}" is not supported; use one of ippools, ipreservations, '
            "ipamconfigs, clusterinformations"
        )
    return kind


def _validate_name(name: str) -> None:
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise ValidationError(
            "metadata.name",
            f"{name!r} must be lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit",
        )


def _validate_reservation(reservation: IPReservation) -> None:
    for index, cidr in enumerate(reservation.reserved_cidrs):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except (TypeError, ValueError) as err:
            raise ValidationError(
                f"spec.reservedCIDRs[{index}]", f"{cidr!r} is not an IP address or CIDR"
            ) from err


def validate_resource(resource: CtlResource) -> None:
    """Every check that needs only the resource itself; ValidationError names the field."""
    _validate_name(resource.metadata.name)
    if isinstance(resource, IPReservation):
        _validate_reservation(resource)
    elif isinstance(resource, ClusterInformation):
        _validate_cluster_information(resource)
    else:
        resource.validate()


def _document_kind(doc: dict[str, Any]) -> str:
    kind = doc.get("kind")
    if kind not in _DOCUMENT_KINDS:
        raise CommandError(
            f"kind {kind!r} is not supported; use one of IPPool, IPReservation, "
            "IPAMConfiguration, ClusterInformation"
        )
    if doc.get("apiVersion") != API_VERSION:
        raise CommandError(
            f"apiVersion {doc.get('apiVersion')!r} is not supported for {kind}; use {API_VERSION}"
        )
    return _DOCUMENT_KINDS[kind]


def _refuse_unknown_fields(doc: dict[str, Any], kind: str) -> None:
    """A misspelt field must not be dropped silently (calicoctl decodes strictly)."""
    for name in doc:
        if name not in _TOP_LEVEL_FIELDS:
            raise ValidationError(name, "unknown field")
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        raise ValidationError("spec", "must be a mapping")
    for name in spec:
        if name not in _SPEC_FIELDS[kind]:
            raise ValidationError(f"spec.{name}", f"unknown field for {kind}")


def resource_from_document(doc: dict[str, Any]) -> CtlResource:
    """A checked resource; CommandError for a wrong kind/apiVersion, ValidationError
    naming the field for a bad value."""
    kind = _document_kind(doc)
    _refuse_unknown_fields(doc, kind)
    if not isinstance(doc.get("metadata") or {}, dict):
        raise ValidationError("metadata", "must be a mapping")
    resource = _PARSERS[kind](doc)
    validate_resource(resource)
    return resource


def expand_lists(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace `kind: List` (or `IPPoolList`, as `ctl get -o yaml` prints) by its items."""
    expanded = []
    for doc in docs:
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List"):
            items = doc.get("items") or []
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise CommandError(f"{kind}: items must be a list of resources")
            expanded += items
        else:
            expanded.append(doc)
    return expanded


def _name_of(doc: dict[str, Any]) -> Any:
    metadata = doc.get("metadata")
    return metadata.get("name") if isinstance(metadata, dict) else None


def _describe(index: int, doc: dict[str, Any]) -> str:
    name = _name_of(doc)
    return f"document {index}" + (f" ({doc.get('kind')} {name!r})" if name else "")


def parse_resources(docs: list[dict[str, Any]], source: str) -> list[CtlResource]:
    """Every resource of `source`, or CommandError naming the document and the field."""
    resources = []
    for index, doc in enumerate(expand_lists(docs), 1):
        try:
            resources.append(resource_from_document(doc))
        except (CommandError, ValidationError) as err:
            raise CommandError(f"{source}, {_describe(index, doc)}: {err}") from err
    if not resources:
        raise CommandError(f"{source}: no resources found")
    return resources


def identity(doc: dict[str, Any], source: str) -> tuple[str, str]:
    """(kind, name) of a document, for `delete -f`, which needs nothing else from it."""
    kind = _document_kind(doc)
    name = _name_of(doc)
    if not isinstance(name, str) or not name:
        raise CommandError(f"{source}: a {kind} document has no metadata.name")
    return kind, name
