"""From an operator's documents to checked resources: the kind and apiVersion, the
fields each kind has (its CRD's schema, defaults filled in), then Calico's semantic
rules (libcalico/validation.py), before anything is written.

Checks here need nothing but the document; the rules that compare against what is
stored (overlap, immutable fields) live in `store`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from calicoctl.errors import CommandError
from calicoctl.kinds import DOCUMENT_KINDS, Kind
from libcalico.model import (
    API_VERSION,
    ClusterInformation,
    IPAMConfig,
    ObjectMeta,
    Resource,
    ValidationError,
    _typed,
    resource_from_api,
)
from libcalico.validation import default_policy, validate

IPAM_CONFIG_NAME = "default"
DEFAULT_NAMESPACE = "default"
_TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
# ObjectMeta's fields: anything else in metadata is a mistake Go's decoder refuses.
_METADATA_FIELDS = (
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
_POLICIES = ("NetworkPolicy", "GlobalNetworkPolicy")
UNKNOWN_FIELD = "field in document is not recognized or is in the wrong location"


@dataclass
class IPAMConfiguration:
    """The v3 view of the IPAM configuration singleton, stored as Calico's IPAMConfig."""

    metadata: ObjectMeta
    config: IPAMConfig

    kind = "IPAMConfiguration"

    def api_json(self) -> dict[str, Any]:
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
    def from_api(cls, doc: dict[str, Any]) -> IPAMConfiguration:
        spec = doc.get("spec") or {}
        known = ("strictAffinity", "autoAllocateBlocks", "maxBlocksPerHost")
        config = IPAMConfig(
            strict_affinity=_typed(spec, "strictAffinity", bool, False),
            auto_allocate_blocks=_typed(spec, "autoAllocateBlocks", bool, True),
            max_blocks_per_host=_typed(spec, "maxBlocksPerHost", int, 0),
            extra={k: v for k, v in spec.items() if k not in known},
        )
        return cls(ObjectMeta.from_json(doc.get("metadata") or {}), config)

    def validate(self) -> None:
        """libcalico-go's rules for SetIPAMConfig."""
        config = self.config
        if not config.strict_affinity and not config.auto_allocate_blocks:
            raise ValidationError(
                "spec.autoAllocateBlocks",
                "cannot be false while strictAffinity is false (no address could be assigned)",
            )
        if config.max_blocks_per_host > 0 and not config.strict_affinity:
            raise ValidationError(
                "spec.maxBlocksPerHost", "can only be set when strictAffinity is true"
            )


CtlResource = Resource | IPAMConfiguration


def document_of(resource: CtlResource) -> dict[str, Any]:
    """The v3 document of a resource, as `get -o yaml` prints it."""
    if isinstance(resource, IPAMConfiguration):
        return resource.api_json()
    from libcalico.model import api_document

    return api_document(resource)


def _without_nulls(value: Any) -> Any:
    """Go decodes `null` as "unset", which its encoder then omits."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _cluster_information(doc: dict[str, Any]) -> ClusterInformation:
    """Empty strings are unset, as Go's `omitempty` drops them when Calico stores it."""
    info = ClusterInformation.from_api(doc)
    info.spec = {k: v for k, v in info.spec.items() if v != ""}
    return info


_BUILDERS: dict[str, Callable[[dict[str, Any]], CtlResource]] = {
    "IPAMConfiguration": IPAMConfiguration.from_api,
    "ClusterInformation": _cluster_information,
}


def document_kind(doc: dict[str, Any]) -> Kind:
    kind = DOCUMENT_KINDS.get(doc.get("kind"))  # type: ignore[arg-type]
    if kind is None or doc.get("apiVersion") != API_VERSION:
        raise CommandError(
            f"unknown resource type ({doc.get('kind')}) and/or version ({doc.get('apiVersion')})"
        )
    return kind


def _check_shape(doc: dict[str, Any]) -> None:
    for name in doc:
        if name not in _TOP_LEVEL_FIELDS:
            raise ValidationError(name, UNKNOWN_FIELD)
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        raise ValidationError("metadata", "must be a mapping with a name")
    for name in metadata:
        if name not in _METADATA_FIELDS:
            raise ValidationError(f"metadata.{name}", UNKNOWN_FIELD)
    for name in ("labels", "annotations"):
        values = metadata.get(name) or {}
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            raise ValidationError(f"metadata.{name}", "must map strings to strings")
    if not isinstance(doc.get("spec") or {}, dict):
        raise ValidationError("spec", "must be a mapping")


def _schema(kind: Kind) -> dict[str, Any] | None:
    from calicoctl import schema

    if kind.name == "Node":
        return schema.node_schema()
    return schema.crd_schema(kind.crd) if kind.crd else None


def resource_from_document(doc: dict[str, Any], namespace: str = "") -> CtlResource:
    """A checked resource; CommandError for a wrong kind/apiVersion, ValidationError
    naming the field for a bad value."""
    kind = document_kind(doc)
    if kind.read_only:
        raise CommandError(f"operation apply is not supported on {kind.name}: {kind.read_only}")
    doc = _without_nulls(doc)
    _check_shape(doc)
    doc["kind"] = kind.name
    if kind.namespaced:
        doc["metadata"]["namespace"] = (
            doc["metadata"].get("namespace") or namespace or DEFAULT_NAMESPACE
        )
    else:
        doc["metadata"].pop("namespace", None)
    schema = _schema(kind)
    if schema is not None:
        from calicoctl.schema import checked

        doc = checked(doc, schema)
    if kind.name in _POLICIES:
        doc["spec"] = default_policy(doc.get("spec") or {})
    builder = _BUILDERS.get(kind.name)
    resource = builder(doc) if builder else resource_from_api(kind.name, doc)
    name = resource.metadata.name
    if kind.singleton and name != kind.singleton:
        raise ValidationError("metadata.name", f"{kind.name} must be named {kind.singleton}", name)
    if isinstance(resource, IPAMConfiguration):
        resource.validate()
    else:
        validate(resource)
    return resource


def expand_lists(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace `kind: List` (or `IPPoolList`, as `get -o yaml` prints) by its items."""
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
    return f"document {index}" + (f" ({doc.get('kind')} '{name}')" if name else "")


def failure(err: CommandError | ValidationError, kind: str | None) -> str:
    """calicoctl's wording: `failed to validate 'IPPool' resource: error with field
    spec.cidr = '10.0.0.0/33' (...)`, or the field it does not know."""
    if not isinstance(err, ValidationError):
        return str(err)
    if err.problem == UNKNOWN_FIELD:
        return f"error parsing document: {UNKNOWN_FIELD}: {err.field_path}"
    return f"failed to validate '{kind}' resource: error with field {err.shown} ({err.problem})"


def parse_resources(
    docs: list[dict[str, Any]], source: str, namespace: str = ""
) -> list[CtlResource]:
    """Every resource of `source`, or CommandError naming the document and the field."""
    resources = []
    for index, doc in enumerate(expand_lists(docs), 1):
        try:
            resources.append(resource_from_document(doc, namespace))
        except (CommandError, ValidationError) as err:
            kind = doc.get("kind") if isinstance(doc.get("kind"), str) else None
            raise CommandError(f"{source}, {_describe(index, doc)}: {failure(err, kind)}") from err
    if not resources:
        raise CommandError(f"{source}: no resources found")
    return resources


def identity(doc: dict[str, Any], source: str, namespace: str = "") -> tuple[Kind, str, str]:
    """(kind, name, namespace) of a document, for `delete -f`, which needs no more."""
    kind = document_kind(doc)
    name = _name_of(doc)
    if not isinstance(name, str) or not name:
        raise CommandError(f"{source}: a {kind.name} document has no metadata.name")
    metadata = doc.get("metadata") or {}
    ns = (metadata.get("namespace") or namespace or DEFAULT_NAMESPACE) if kind.namespaced else ""
    return kind, name, ns
