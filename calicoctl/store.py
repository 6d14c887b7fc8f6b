"""Reading and writing resources with Calico's rules across resources.

Every write is validated in full before the first one is made, so a refused document
leaves the datastore untouched; each write is then a compare-and-swap against the
revision that was validated, so a concurrent change is reported instead of overwritten.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from calicoctl.errors import CommandError
from calicoctl.kinds import Kind, kind_named
from calicoctl.resources import (
    IPAM_CONFIG_NAME,
    CtlResource,
    IPAMConfiguration,
    document_of,
    failure,
)
from libcalico.datastore.base import (
    AlreadyExists,
    Conflict,
    Datastore,
    DatastoreError,
    KVPair,
    NotFound,
)
from libcalico.model import (
    ClusterInformation,
    IPAMConfigKey,
    IPPool,
    Key,
    Node,
    ObjectMeta,
    Profile,
    ResourceKey,
    ResourceListOptions,
    Tier,
    ValidationError,
    Value,
    ordered_metadata,
    resource_key,
    tiered_policy_name,
)

DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"
# The tiers calicoctl v3.31 creates with ClusterInformation on its first write.
DEFAULT_TIERS = (
    ("default", 1000000, "Deny"),
    ("adminnetworkpolicy", 1000, "Pass"),
    ("baselineadminnetworkpolicy", 10000000, "Pass"),
)


class WriteMode(Enum):
    """calicoctl's three ways to write: either way, must be new, must exist."""

    APPLY = "apply"
    CREATE = "create"
    REPLACE = "replace"

    @property
    def past(self) -> str:
        return {"apply": "applied", "create": "created", "replace": "replaced"}[self.value]


@dataclass
class StoredResource:
    """A resource as read back, with the revision a later write must match."""

    resource: CtlResource
    revision: str | None

    def to_json(self) -> dict[str, Any]:
        doc = document_of(self.resource)
        if self.revision is not None:
            doc["metadata"] = ordered_metadata(dict(doc["metadata"], resourceVersion=self.revision))
        return doc


def _key_for(kind: Kind, name: str, namespace: str = "") -> Key:
    if kind.name == "IPAMConfiguration":
        return IPAMConfigKey()
    if kind.name in ("NetworkPolicy", "GlobalNetworkPolicy"):
        name = tiered_policy_name(name)
    return ResourceKey(kind.name, name, namespace if kind.namespaced else "")


def _key(resource: CtlResource) -> Key:
    if isinstance(resource, IPAMConfiguration):
        return IPAMConfigKey()
    return resource_key(resource)


def _value(resource: CtlResource) -> Value:
    return resource.config if isinstance(resource, IPAMConfiguration) else resource


def _resource(kind: Kind, value: Value) -> CtlResource:
    if kind.name == "IPAMConfiguration":
        return IPAMConfiguration(ObjectMeta(IPAM_CONFIG_NAME), value)
    return value


def ref(kind: str, name: str, namespace: str = "") -> str:
    """How Calico's messages name a resource: `IPPool(default-ipv4-ippool)`."""
    return f"{kind}({namespace}/{name})" if namespace else f"{kind}({name})"


def _ref(resource: CtlResource) -> str:
    return ref(resource.kind, resource.metadata.name, resource.metadata.namespace)


def not_found(kind: str, name: str, namespace: str = "") -> CommandError:
    return CommandError(f"resource does not exist: {ref(kind, name, namespace)} with error: <nil>")


def _rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _check_pool(pool: IPPool, old: IPPool | None, pools: dict[str, IPPool]) -> None:
    """Calico's IPPool rules that depend on other pools: CIDR and blockSize are
    immutable, and no two pools overlap."""
    network = pool.network
    if old is not None:
        if old.network != network:
            raise ValidationError(
                "spec.cidr",
                f"cannot change from {old.spec.cidr}: IPPool CIDR cannot be modified",
                pool.spec.cidr,
            )
        if old.spec.block_size != pool.spec.block_size:
            raise ValidationError(
                "spec.blockSize",
                f"cannot change from {old.spec.block_size}: IPPool BlockSize cannot be modified",
                pool.spec.block_size,
            )
    for other in pools.values():
        if (
            other.name != pool.name
            and other.network.version == network.version
            and other.network.overlaps(network)
        ):
            raise ValidationError(
                "spec.cidr",
                f"IPPool({pool.name}) CIDR overlaps with IPPool({other.name}) CIDR "
                f"{other.spec.cidr}",
                pool.spec.cidr,
            )


def _default_allow() -> StoredResource:
    """The profile Calico presents in every datastore without storing it."""
    rule = {"action": "Allow", "source": {}, "destination": {}}
    profile = Profile(
        ObjectMeta(DEFAULT_ALLOW_PROFILE, {}, {"creationTimestamp": None}),
        {"ingress": [dict(rule)], "egress": [dict(rule)]},
    )
    return StoredResource(profile, "1")


class ResourceClient:
    """get / list / write / delete of every kind calicoctl knows."""

    def __init__(self, store: Datastore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    # ------------------------------------------------------------------ reads

    def find(self, kind: Kind, name: str, namespace: str = "") -> StoredResource | None:
        if kind.singleton and name != kind.singleton:
            return None
        try:
            kvp = self.store.get(_key_for(kind, name, namespace))
        except NotFound:
            if kind.name == "Profile" and name == DEFAULT_ALLOW_PROFILE:
                return _default_allow()
            return None
        return StoredResource(_resource(kind, kvp.value), kvp.revision)

    def get(self, kind: Kind, name: str, namespace: str = "") -> StoredResource:
        found = self.find(kind, name, namespace)
        if found is None:
            raise not_found(kind.name, name, namespace if kind.namespaced else "")
        return found

    def list(self, kind: Kind, namespace: str | None = None) -> list[StoredResource]:
        """Every resource of `kind` (in `namespace`, or all of them when None)."""
        if kind.name == "IPAMConfiguration":
            found = self.find(kind, IPAM_CONFIG_NAME)
            return [found] if found else []
        found = [
            StoredResource(kvp.value, kvp.revision)
            for kvp in self.store.list(ResourceListOptions(kind.name))
            if namespace is None or kvp.value.metadata.namespace == namespace
        ]
        if kind.name == "Profile" and all(
            s.resource.metadata.name != DEFAULT_ALLOW_PROFILE for s in found
        ):
            found.insert(0, _default_allow())
        if kind.name == "Tier":  # Calico lists tiers in the order they apply
            found.sort(key=lambda s: float(s.resource.spec.get("order") or 0))
        return found

    # ----------------------------------------------------------------- writes

    def write(self, resources: list[CtlResource], mode: WriteMode) -> None:
        """Validate every resource against the datastore and each other, then write them
        in order; CommandError says what was refused, or how far a failed run got."""
        plan = self._plan(resources, mode)
        for done, (resource, existing) in enumerate(plan):
            kvp = KVPair(_key(resource), _value(resource))
            try:
                if existing is None:
                    self.store.create(kvp)
                else:
                    kvp.revision = existing.revision
                    self.store.update(kvp)
            except (AlreadyExists, Conflict, NotFound) as err:
                raise CommandError(
                    f"Failed to {mode.value} {_ref(resource)}: it was changed by someone else "
                    f"meanwhile; {done} of {len(plan)} resource(s) were "
                    f"{mode.past} before it. Run the command again."
                ) from err
            except DatastoreError as err:
                before = f" ({done} of {len(plan)} were {mode.past} before it)" if done else ""
                raise CommandError(
                    f"Failed to {mode.value} {_ref(resource)}{before}: {err}"
                ) from err
        self.ensure_initialized()

    def _plan(
        self, resources: list[CtlResource], mode: WriteMode
    ) -> list[tuple[CtlResource, StoredResource | None]]:
        pools: dict[str, IPPool] | None = None
        plan: list[tuple[CtlResource, StoredResource | None]] = []
        seen: set[tuple[str, str, str]] = set()
        for resource in resources:
            kind = kind_named(resource.kind)
            ident = (kind.name, resource.metadata.name, resource.metadata.namespace)
            if ident in seen:
                raise CommandError(f"{_ref(resource)} is given twice")
            seen.add(ident)
            existing = self.find(kind, resource.metadata.name, resource.metadata.namespace)
            try:
                self._check(resource, existing, mode)
                if isinstance(resource, IPPool):
                    if pools is None:
                        pools = {s.resource.metadata.name: s.resource for s in self.list(kind)}
                    old = existing.resource if existing else None
                    _check_pool(resource, old, pools)  # type: ignore[arg-type]
                    pools[resource.metadata.name] = resource
            except ValidationError as err:
                raise CommandError(
                    f"Failed to {mode.value} {_ref(resource)}: {failure(err, kind.name)}"
                ) from err
            self._stamp(resource, existing)
            plan.append((resource, existing))
        return plan

    def _check(
        self, resource: CtlResource, existing: StoredResource | None, mode: WriteMode
    ) -> None:
        if mode is WriteMode.CREATE and existing is not None:
            raise CommandError(f"resource already exists: {_ref(resource)}")
        if mode is WriteMode.REPLACE and existing is None:
            raise not_found(resource.kind, resource.metadata.name, resource.metadata.namespace)
        version = resource.metadata.extra.pop("resourceVersion", None)
        if version is not None and (existing is None or existing.revision != str(version)):
            raise CommandError(
                f"{_ref(resource)} has been modified since resourceVersion {version} was "
                "read; get it again and reapply"
            )

    def _stamp(self, resource: CtlResource, existing: StoredResource | None) -> None:
        """uid and creationTimestamp: set on create, carried over on update."""
        if isinstance(resource, IPAMConfiguration):
            return  # Calico stores only the configuration values for the singleton
        extra = resource.metadata.extra
        if existing is None:
            extra.setdefault("uid", str(uuid.uuid4()))
            extra.setdefault("creationTimestamp", _rfc3339(self._clock()))
            return
        for name in ("uid", "creationTimestamp"):
            if name in existing.resource.metadata.extra:
                extra[name] = existing.resource.metadata.extra[name]

    def put(self, resource: CtlResource) -> None:
        """Store `resource` as given, over whatever is there (a migration's import)."""
        kind = kind_named(resource.kind)
        existing = self.find(kind, resource.metadata.name, resource.metadata.namespace)
        self._stamp(resource, existing)
        kvp = KVPair(_key(resource), _value(resource))
        if existing is None:
            self.store.create(kvp)
        else:
            kvp.revision = existing.revision
            self.store.update(kvp)

    def _new_meta(self, name: str) -> ObjectMeta:
        return ObjectMeta(
            name, {}, {"uid": str(uuid.uuid4()), "creationTimestamp": _rfc3339(self._clock())}
        )

    def ensure_initialized(self) -> None:
        """What calicoctl's first write leaves, so real Calico components find it:
        ClusterInformation `default` (a GUID, datastoreReady; clusterType `kdd` in the
        Kubernetes datastore) and the default tiers."""
        from libcalico.datastore.kubernetes import KubernetesDatastore

        info = ClusterInformation(
            self._new_meta("default"), {"clusterGUID": uuid.uuid4().hex, "datastoreReady": True}
        )
        if isinstance(self.store, KubernetesDatastore):
            info.spec["clusterType"] = "kdd"
        tiers = [
            Tier(self._new_meta(name), {"order": order, "defaultAction": action})
            for name, order, action in DEFAULT_TIERS
        ]
        for resource in (info, *tiers):
            key = resource_key(resource)
            try:
                self.store.get(key)
            except NotFound:
                with contextlib.suppress(AlreadyExists):
                    self.store.create(KVPair(key, resource))

    def delete(self, kind: Kind, name: str, namespace: str = "", force: bool = False) -> None:
        """Delete one resource. An IP pool with addresses in use is kept unless `force`:
        Calico would delete it and strand those addresses outside any pool.
        ClusterInformation is never deleted (calicoctl refuses too): calico/node owns it,
        and an operator changes `datastoreReady` with apply instead. A Node takes its
        endpoints, addresses and affinities with it (node_removal.py)."""
        if kind.name == "ClusterInformation":
            raise CommandError(
                f"operation delete is not supported on {kind.name}; "
                "apply it with the spec wanted (e.g. datastoreReady: true) instead"
            )
        if kind.read_only:
            raise CommandError(
                f"operation delete is not supported on {kind.name}: {kind.read_only}"
            )
        existing = self.get(kind, name, namespace)
        if kind.name == "IPPool" and not force:
            in_use = self._addresses_in_use(name)
            if in_use:
                raise CommandError(
                    f"IPPool({name}) still has {in_use} address(es) in use; delete their "
                    "workloads (or `calicoctl ipam release` them) first, or pass --force to "
                    "delete the pool and leave them allocated"
                )
        if kind.name == "Node":
            from calicoctl.node_removal import remove_node_data
            from libcalico.datastore.kubernetes import KubernetesDatastore

            node = existing.resource
            assert isinstance(node, Node)
            if not isinstance(self.store, KubernetesDatastore):  # there it refuses, below
                remove_node_data(self.store, node)
        try:
            self.store.delete(KVPair(_key_for(kind, name, namespace), None, existing.revision))
        except (Conflict, NotFound) as err:
            raise CommandError(
                f"Failed to delete {ref(kind.name, name, namespace)}: it was changed by someone "
                "else meanwhile. Run the command again."
            ) from err

    def _addresses_in_use(self, pool_name: str) -> int:
        from ipam_plugin.inspect import pool_usage

        return sum(usage.in_use for usage in pool_usage(self.store) if usage.name == pool_name)
