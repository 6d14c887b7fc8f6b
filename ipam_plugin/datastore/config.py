"""Choosing and opening the datastore, the way calicoctl and the CNI plugin choose it.

Netconf keys win, then the environment (`DATASTORE_TYPE`, `LOCAL_DATASTORE_PATH`,
`ETCD_ENDPOINTS`, ...). Unlike real Calico, where nothing configured means Kubernetes,
nothing configured here means the embedded `local` SQLite datastore.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cni_plugin.types import ERR_INVALID_CONFIG, ERR_TRY_AGAIN_LATER, CNIError
from ipam_plugin.datastore.base import Datastore, DatastoreUnavailable

DEFAULT_LOCAL_PATH = "/var/lib/calico/calico.db"
_TYPES = ("local", "etcdv3", "kubernetes")


@dataclass
class DatastoreSettings:
    type: str
    local_path: str = DEFAULT_LOCAL_PATH
    etcd_endpoints: str = ""

    @classmethod
    def resolve(
        cls, conf: dict[str, Any], environ: dict[str, str] | None = None
    ) -> DatastoreSettings:
        env = os.environ if environ is None else environ
        endpoints = conf.get("etcd_endpoints") or env.get("ETCD_ENDPOINTS", "")
        kind = conf.get("datastore_type") or env.get("DATASTORE_TYPE", "")
        if not kind:
            kind = "etcdv3" if endpoints else "local"
        if kind not in _TYPES:
            raise CNIError(
                ERR_INVALID_CONFIG, f'unknown datastore_type "{kind}"', f"use one of {list(_TYPES)}"
            )
        path = (
            conf.get("local_datastore_path")
            or env.get("LOCAL_DATASTORE_PATH")
            or DEFAULT_LOCAL_PATH
        )
        return cls(type=kind, local_path=path, etcd_endpoints=endpoints)

    def open(self) -> Datastore:
        if self.type != "local":
            raise CNIError(
                ERR_INVALID_CONFIG,
                f"datastore_type {self.type} is not supported by this build yet",
                "use datastore_type local (the default)",
            )
        # Imported here so that range mode and the other verbs never load sqlite3.
        from ipam_plugin.datastore.local import LocalDatastore

        try:
            return LocalDatastore(self.local_path)
        except DatastoreUnavailable as err:
            raise CNIError(ERR_TRY_AGAIN_LATER, f"datastore unavailable: {err}") from err
