"""Reading and writing `ctl`'s resources with Calico's rules across resources.

Every write is validated in full before the first one is made, so a refused document
leaves the datastore untouched; each write is then a compare-and-swap against the
revision that was validated, so a concurrent change is reported instead of overwritten.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from calicoctl.errors import CommandError
from calicoctl.resources import (
    CLUSTERINFORMATION,
    IPAM_CONFIG_NAME,
    IPAMCONFIGURATION,
    IPPOOL,
    CtlResource,
    IPAMConfiguration,
    validate_resource,
)
from libcalico.datastore.base import (
    AlreadyExists,
    Conflict,
    Datastore,
    KVPair,
    NotFound,
)
from libcalico.model import (
    IPAMConfigKey,
    IPPool,
    Key,
    ObjectMeta,
    ResourceKey,
    ResourceListOptions,
    ValidationError,
    Value,
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
        doc = self.resource.to_json()
        if self.revision is not None:
            doc["metadata"]["resourceVersion"] = self.revision
        return doc


def _key(kind: str, name: str) -> Key:
    """IPAMConfiguration is Calico's IPAMConfig singleton; the others are v3 resources."""
    return IPAMConfigKey() if kind == IPAMCONFIGURATION else ResourceKey(kind, name)


def _value(resource: CtlResource) -> Value:
    return resource.config if isinstance(resource, IPAMConfiguration) else resource


def _resource(kind: str, name: str, value: Value) -> CtlResource:
    return IPAMConfiguration(ObjectMeta(name), value) if kind == IPAMCONFIGURATION else value


def _ref(resource: CtlResource) -> str:
    """How Calico's messages name a resource: `IPPool(default-ipv4-ippool)`."""
    return f"{resource.kind}({resource.metadata.name})"


def _not_found(kind: str, name: str) -> CommandError:
    return CommandError(f"resource does not exist: {kind}({name})")


def _rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _check_pool(pool: IPPool, old: IPPool | None, pools: dict[str, IPPool]) -> None:
    """Calico's IPPool rules that depend on other pools: CIDR and blockSize are
    immutable, and no two pools overlap."""
    network = pool.network
    if old is not None:
        if old.network != network:
            raise ValidationError(
                "spec.cidr", f"cannot change from {old.spec.cidr}: IPPool CIDR cannot be modified"
            )
        if old.spec.block_size != pool.spec.block_size:
            raise ValidationError(
                "spec.blockSize",
                f"cannot change from {old.spec.block_size}: IPPool BlockSize cannot be modified",
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
            )


class ResourceClient:
    """get / list / write / delete of IPPool, IPReservation, IPAMConfiguration and
    ClusterInformation."""

    def __init__(self, store: Datastore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    # ------------------------------------------------------------------ reads

    def find(self, kind: str, name: str) -> StoredResource | None:
        if kind == IPAMCONFIGURATION and name != IPAM_CONFIG_NAME:
            return None
        try:
            kvp = self.store.get(_key(kind, name))
        except NotFound:
            return None
        return StoredResource(_resource(kind, name, kvp.value), kvp.revision)

    def get(self, kind: str, name: str) -> StoredResource:
        found = self.find(kind, name)
        if found is None:
            raise _not_found(kind, name)
        return found

    def list(self, kind: str) -> list[StoredResource]:
        if kind == IPAMCONFIGURATION:
            found = self.find(kind, IPAM_CONFIG_NAME)
            return [found] if found else []
        return [
            StoredResource(kvp.value, kvp.revision)
            for kvp in self.store.list(ResourceListOptions(kind))
        ]

    # ----------------------------------------------------------------- writes

    def write(self, resources: list[CtlResource], mode: WriteMode) -> None:
        """Validate every resource against the datastore and each other, then write them
        in order; CommandError says what was refused, or how far a failed run got."""
        plan = self._plan(resources, mode)
        for done, (resource, existing) in enumerate(plan):
            kvp = KVPair(_key(resource.kind, resource.metadata.name), _value(resource))
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

    def _plan(
        self, resources: list[CtlResource], mode: WriteMode
    ) -> list[tuple[CtlResource, StoredResource | None]]:
        pools = {stored.resource.metadata.name: stored.resource for stored in self.list(IPPOOL)}
        plan: list[tuple[CtlResource, StoredResource | None]] = []
        seen: set[tuple[str, str]] = set()
        for resource in resources:
            ident = (resource.kind, resource.metadata.name)
            if ident in seen:
                raise CommandError(f"{_ref(resource)} is given twice")
            seen.add(ident)
            existing = self.find(*ident)
            try:
                self._check(resource, existing, mode, pools)
            except ValidationError as err:
                raise CommandError(f"Failed to {mode.value} {_ref(resource)}: {err}") from err
            if isinstance(resource, IPPool):
                pools[resource.metadata.name] = resource
            self._stamp(resource, existing)
            plan.append((resource, existing))
        return plan

    def _check(
        self,
        resource: CtlResource,
        existing: StoredResource | None,
        mode: WriteMode,
        pools: dict[str, IPPool],
    ) -> None:
        if mode is WriteMode.CREATE and existing is not None:
            raise CommandError(f"resource already exists: {_ref(resource)}")
        if mode is WriteMode.REPLACE and existing is None:
            raise _not_found(resource.kind, resource.metadata.name)
        version = resource.metadata.extra.pop("resourceVersion", None)
        if version is not None and (existing is None or existing.revision != str(version)):
            raise CommandError(
                f"{_ref(resource)} has been modified since resourceVersion {version} was "
                "read; get it again and reapply"
            )
        validate_resource(resource)
        if isinstance(resource, IPPool):
            old = existing.resource if existing else None
            _check_pool(resource, old, pools)  # type: ignore[arg-type]

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

    def delete(self, kind: str, name: str, force: bool = False) -> None:
        """Delete one resource. An IP pool with addresses in use is kept unless `force`:
        Calico would delete it and strand those addresses outside any pool.
        ClusterInformation is never deleted (calicoctl refuses too): calico/node owns it,
        and an operator changes `datastoreReady` with apply instead."""
        if kind == CLUSTERINFORMATION:
            raise CommandError(
                f"operation delete is not supported on {kind}; "
                "apply it with the spec wanted (e.g. datastoreReady: true) instead"
            )
        existing = self.get(kind, name)
        if kind == IPPOOL and not force:
            in_use = self._addresses_in_use(name)
            if in_use:
                raise CommandError(
                    f"IPPool({name}) still has {in_use} address(es) in use; delete their "
                    "workloads (or `calico ipam release` them) first, or pass --force to "
                    "delete the pool and leave them allocated"
                )
        try:
            self.store.delete(KVPair(_key(kind, name), None, existing.revision))
        except (Conflict, NotFound) as err:
            raise CommandError(
                f"Failed to delete {kind}({name}): it was changed by someone else meanwhile. "
                "Run the command again."
            ) from err

    def _addresses_in_use(self, pool_name: str) -> int:
        from ipam_plugin.inspect import pool_usage

        return sum(usage.in_use for usage in pool_usage(self.store) if usage.name == pool_name)
