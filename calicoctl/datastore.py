"""Choosing the datastore for the admin commands, as calicoctl chooses it.

The environment (`DATASTORE_TYPE`, `LOCAL_DATASTORE_PATH`, `ETCD_ENDPOINTS`, ...) applies
unless `--config FILE` names a file. That file holds either the netconf keys
(`datastore_type`, `local_datastore_path`, `etcd_endpoints`, ...) or calicoctl's own
`CalicoAPIConfig` document, whose camelCase spec keys are mapped onto the netconf ones.
"""

from __future__ import annotations

from typing import Any

from calicoctl.errors import CommandError
from libcalico.datastore.base import Datastore

# CalicoAPIConfig spec key -> netconf key
_API_CONFIG_KEYS = {
    "datastoreType": "datastore_type",
    "etcdEndpoints": "etcd_endpoints",
    "kubeconfig": "kubeconfig",
    "localDatastorePath": "local_datastore_path",
}


def netconf_keys(doc: dict[str, Any]) -> dict[str, Any]:
    """The datastore keys of a config file, whichever of the two forms it is in."""
    if doc.get("kind") != "CalicoAPIConfig":
        return doc
    spec = doc.get("spec") or {}
    return {ours: spec[theirs] for theirs, ours in _API_CONFIG_KEYS.items() if theirs in spec}


def load_config_file(path: str) -> dict[str, Any]:
    from calicoctl.documents import load_documents

    docs = load_documents(path)
    if len(docs) != 1:
        raise CommandError(f"config file {path} must hold exactly one document")
    return netconf_keys(docs[0])


def open_datastore(config_path: str | None) -> Datastore:
    """Open the configured datastore; CNIError/DatastoreError propagate to the CLI."""
    from libcalico.datastore.config import DatastoreSettings

    conf = load_config_file(config_path) if config_path else {}
    return DatastoreSettings.resolve(conf).open()
