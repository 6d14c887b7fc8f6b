"""`calicoctl datastore migrate lock | export | import | unlock`: move a cluster's Calico
data between any two datastores (local, etcdv3, kubernetes), where calicoctl only moves
etcd to Kubernetes.

The export is calicoctl's layout, sections split by `===` lines: the v3 resources as YAML
`<Kind>List` documents (metadata that belongs to the old store left out), the
ClusterInformation as JSON, then the IPAM data as JSON with each object's etcd key
(`blocks`, `block_affinities`, `handles`, `config`), so either tool can read the other's.
A fourth section, ours, holds the WorkloadEndpoints and Profiles the CNI plugin recorded:
in etcd and the local datastore they are data (`ipam check` matches addresses against
them); the Kubernetes datastore derives them from pods and namespaces, so they are not
imported there.

Export and import want the source locked (ClusterInformation `datastoreReady: false`),
which makes the CNI plugin refuse ADDs (try again later) while DELs go on, so no address
is handed out that the export would miss. The import leaves the target locked until
`unlock`, and refuses a target that already holds IP pools or IPAM blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from calicoctl.config import datastore_type, open_datastore
from calicoctl.errors import CommandError
from calicoctl.kinds import kind_named
from calicoctl.store import DEFAULT_ALLOW_PROFILE, ResourceClient, StoredResource
from libcalico.datastore.base import AlreadyExists, Datastore, KVPair, NotFound
from libcalico.model import (
    BlockAffinityListOptions,
    BlockListOptions,
    ClusterInformation,
    HandleListOptions,
    IPAMConfigKey,
    ObjectMeta,
    ResourceKey,
    ResourceListOptions,
    decode_value,
    key_from_path,
    key_path,
    resource_key,
)

SECTION = "==="
# The kinds exported, in calicoctl's order of creation on import.
EXPORTED = (
    "IPPool",
    "BGPPeer",
    "Tier",
    "GlobalNetworkPolicy",
    "GlobalNetworkSet",
    "KubeControllersConfiguration",
    "NetworkPolicy",
    "NetworkSet",
    "Node",
    "BGPConfiguration",
    "FelixConfiguration",
    "IPReservation",
)
ENDPOINTS = ("Profile", "WorkloadEndpoint")
_STALE_METADATA = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp")
_DERIVED_NODE_FIELDS = ("addresses", "orchRefs")
_NOT_LOCKED = (
    "datastore is not locked. Run the `calicoctl datastore migrate lock` command in order to "
    "begin migration"
)


def _cluster_information(store: Datastore) -> ClusterInformation | None:
    try:
        return store.get(ResourceKey("ClusterInformation", "default")).value
    except NotFound:
        return None


def _set_ready(store: Datastore, ready: bool) -> None:
    key = ResourceKey("ClusterInformation", "default")
    try:
        kvp = store.get(key)
    except NotFound:
        ResourceClient(store).ensure_initialized()
        kvp = store.get(key)
    kvp.value.spec["datastoreReady"] = ready
    store.update(kvp)


def _locked(store: Datastore) -> bool:
    info = _cluster_information(store)
    return info is not None and info.spec.get("datastoreReady") is False


def _clean(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    meta = {k: v for k, v in doc["metadata"].items() if k not in _STALE_METADATA}
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if k != "projectcalico.org/kube-labels"
    }
    meta.pop("annotations", None)
    if annotations:
        meta["annotations"] = annotations
    if kind == "Node":
        # Derived from the Kubernetes Node when read there; not the operator's settings.
        doc["spec"] = {k: v for k, v in doc["spec"].items() if k not in _DERIVED_NODE_FIELDS}
    return {**doc, "metadata": meta}


def _listing(kind: str, found: list[StoredResource]) -> dict[str, Any]:
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": f"{kind}List",
        "items": [_clean(stored.to_json(), kind) for stored in found],
    }


def _ipam(store: Datastore) -> dict[str, Any]:
    """calicoctl's IPAM export: each object with its etcd key."""

    def pairs(options: Any) -> list[dict[str, Any]]:
        return [
            {"Key": key_path(kvp.key), "Value": kvp.value.to_json(), "TTL": 0}
            for kvp in store.list(options)
        ]

    doc: dict[str, Any] = {
        "block_affinities": pairs(BlockAffinityListOptions()),
        "blocks": pairs(BlockListOptions()),
        "handles": pairs(HandleListOptions()),
    }
    with contextlib.suppress(NotFound):
        config = store.get(IPAMConfigKey())
        doc["config"] = {"Key": key_path(config.key), "Value": config.value.to_json(), "TTL": 0}
    return {k: v for k, v in doc.items() if v}


def _stored(found: StoredResource) -> bool:
    """Not the profile Calico presents everywhere without storing it."""
    return found.resource.metadata.name != DEFAULT_ALLOW_PROFILE


def export(store: Datastore) -> str:
    """The whole export, as text."""
    from calicoctl.documents import dump_yaml

    client = ResourceClient(store)
    resources = "".join(
        dump_yaml(_listing(kind, client.list(kind_named(kind)))) + "---\n" for kind in EXPORTED
    )
    info = _cluster_information(store)
    info_text = json.dumps(info.api_json() if info else {}, indent=2)
    endpoints = "".join(
        dump_yaml(_listing(kind, [s for s in client.list(kind_named(kind)) if _stored(s)]))
        + "---\n"
        for kind in ENDPOINTS
    )
    return (
        f"{resources}{SECTION}\n{info_text}\n{SECTION}\n{json.dumps(_ipam(store), indent=2)}\n"
        f"{SECTION}\n{endpoints}"
    )


def _export(opts: argparse.Namespace) -> int:
    with open_datastore(opts.config) as store:
        if not _locked(store):
            raise CommandError(_NOT_LOCKED)
        text = export(store)
    print(text, end="")
    return 0


# ------------------------------------------------------------------ import


def _split(text: str) -> list[str]:
    """The export's sections: resources, ClusterInformation, IPAM (and endpoints)."""
    sections = re.split(rf"^{SECTION}$\n?", text, flags=re.MULTILINE)
    if len(sections) not in (3, 4):
        raise CommandError(
            "the file is not a `datastore migrate export`: expected sections split by "
            f"'{SECTION}' lines"
        )
    return [*sections, ""][:4]


def _ipam_pairs(doc: dict[str, Any]) -> list[KVPair]:
    """The IPAM objects of the export, config first, then blocks, affinities, handles."""
    entries = [doc["config"]] if doc.get("config") else []
    for section in ("blocks", "block_affinities", "handles"):
        entries += doc.get(section) or []
    pairs = []
    for entry in entries:
        key = key_from_path(str(entry.get("Key", "")))
        if key is None or isinstance(key, ResourceKey):
            raise CommandError(f"the export names an unknown IPAM key {entry.get('Key')!r}")
        pairs.append(KVPair(key, decode_value(key, json.dumps(entry.get("Value") or {}))))
    return pairs


def _target_is_empty(store: Datastore) -> None:
    for options, what in (
        (BlockListOptions(), "IPAM blocks"),
        (ResourceListOptions("IPPool"), "IP pools"),
    ):
        if store.list(options):
            raise CommandError(
                f"the target datastore already holds {what}: import into an empty datastore"
            )


@dataclass
class Export:
    """An export read back: what to write, in order."""

    resources: list[Any]
    info: ClusterInformation | None
    ipam: list[KVPair]


def _items(text: str, source: str) -> list[dict[str, Any]]:
    from calicoctl.documents import parse_documents
    from calicoctl.resources import expand_lists

    return expand_lists(parse_documents(text, source))


def parse_export(text: str, source: str, target_type: str) -> Export:
    from calicoctl.resources import parse_resources
    from libcalico.model import resource_from_api

    resources_text, info_text, ipam_text, endpoints_text = _split(text)
    items = _items(resources_text, source)
    resources = parse_resources(items, source) if items else []
    try:
        info_doc = json.loads(info_text) if info_text.strip() else {}
        ipam_doc = json.loads(ipam_text) if ipam_text.strip() else {}
    except ValueError as err:
        raise CommandError(f"{source}: its ClusterInformation or IPAM section is not JSON") from err
    info = ClusterInformation.from_api(info_doc) if info_doc.get("metadata") else None
    if target_type != "kubernetes":
        resources += [
            resource_from_api(str(doc.get("kind")), doc) for doc in _items(endpoints_text, source)
        ]
    return Export(resources, info, _ipam_pairs(ipam_doc))


def _import(opts: argparse.Namespace) -> int:
    from calicoctl.documents import read_source, source_name

    target_type = datastore_type(opts.config)
    data = parse_export(read_source(opts.filename), source_name(opts.filename), target_type)
    info = data.info
    with open_datastore(opts.config) as store:
        _target_is_empty(store)
        _set_ready(store, False)
        client = ResourceClient(store)
        for resource in data.resources:
            client.put(resource)
        if info is not None:
            key = resource_key(info)
            current = store.get(key)
            info.metadata = ObjectMeta("default", {}, current.value.metadata.extra)
            info.spec["datastoreReady"] = False
            if target_type == "kubernetes" and "kdd" not in str(info.spec.get("clusterType", "")):
                types = [t for t in str(info.spec.get("clusterType", "")).split(",") if t]
                info.spec["clusterType"] = ",".join([*types, "kdd"])
            store.update(KVPair(key, info, current.revision))
        for kvp in data.ipam:
            try:
                store.create(kvp)
            except AlreadyExists as err:
                raise CommandError(f"the target already holds {key_path(kvp.key)}") from err
    print(
        f"Successfully imported {len(data.resources)} resource(s) and {len(data.ipam)} IPAM "
        "object(s)."
    )
    print("Data store is locked: run `calicoctl datastore migrate unlock` once it looks right.")
    return 0


def _lock(opts: argparse.Namespace, ready: bool) -> int:
    with open_datastore(opts.config) as store:
        _set_ready(store, ready)
    print("Datastore unlocked." if ready else "Datastore locked.")
    return 0


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="datastore_command", metavar="COMMAND")
    migrate = sub.add_parser("migrate", help="move Calico's data to another datastore")
    steps = migrate.add_subparsers(dest="migrate_command", metavar="COMMAND")
    lock = steps.add_parser("lock", parents=[common], help="stop changes (CNI ADDs) for a move")
    lock.set_defaults(handler=lambda opts: _lock(opts, False))
    unlock = steps.add_parser("unlock", parents=[common], help="allow changes again")
    unlock.set_defaults(handler=lambda opts: _lock(opts, True))
    out = steps.add_parser("export", parents=[common], help="print the locked datastore's data")
    out.set_defaults(handler=_export)
    into = steps.add_parser("import", parents=[common], help="store an export in this datastore")
    into.add_argument("-f", "--filename", required=True, metavar="FILE", help="or - for stdin")
    into.set_defaults(handler=_import)
