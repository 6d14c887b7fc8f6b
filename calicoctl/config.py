"""Choosing the datastore as calicoctl chooses it.

`-c/--config FILE` names a `CalicoAPIConfig` document (default `/etc/calico/calicoctl.cfg`,
used when it exists); without one, the environment (`DATASTORE_TYPE`, `ETCD_ENDPOINTS`,
`KUBECONFIG`, ...). The document's spec keys are the camelCase of those variables, as
calicoctl's are (`etcdEndpoints`, `kubeconfig`, and `localDatastorePath` for our
`LOCAL_DATASTORE_PATH`). With nothing configured, unlike calicoctl (which tries etcd on
localhost), it is the embedded local datastore. A file of netconf keys
(`datastore_type`, `etcd_endpoints`, ...) is accepted too, as the CNI plugin reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from calicoctl.errors import CommandError
from libcalico.datastore.base import Datastore

DEFAULT_CONFIG = "/etc/calico/calicoctl.cfg"
# CalicoAPIConfig spec key -> the environment variable it stands for.
_SPEC_KEYS = {
    "datastoreType": "DATASTORE_TYPE",
    "etcdEndpoints": "ETCD_ENDPOINTS",
    "etcdKeyFile": "ETCD_KEY_FILE",
    "etcdCertFile": "ETCD_CERT_FILE",
    "etcdCACertFile": "ETCD_CA_CERT_FILE",
    "kubeconfig": "KUBECONFIG",
    "k8sAPIEndpoint": "K8S_API_ENDPOINT",
    "k8sKeyFile": "K8S_KEY_FILE",
    "k8sCertFile": "K8S_CERT_FILE",
    "k8sCAFile": "K8S_CA_FILE",
    "k8sAPIToken": "K8S_API_TOKEN",
    "k8sInsecureSkipTLSVerify": "K8S_INSECURE_SKIP_TLS_VERIFY",
    "localDatastorePath": "LOCAL_DATASTORE_PATH",
}


def environment_of(doc: dict[str, Any], path: str) -> dict[str, str]:
    """The environment a CalicoAPIConfig document stands for."""
    if doc.get("apiVersion") != "projectcalico.org/v3":
        raise CommandError(
            f"config file {path}: apiVersion must be projectcalico.org/v3 for a CalicoAPIConfig"
        )
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        raise CommandError(f"config file {path}: spec must be a mapping")
    for key in spec:
        if key not in _SPEC_KEYS:
            raise CommandError(
                f"config file {path}: unknown CalicoAPIConfig field spec.{key} "
                f"(known: {', '.join(_SPEC_KEYS)})"
            )
    env = {
        _SPEC_KEYS[k]: str(v).lower() if isinstance(v, bool) else str(v) for k, v in spec.items()
    }
    if env.get("DATASTORE_TYPE") == "etcdv3" or "ETCD_ENDPOINTS" in env:
        env.setdefault("DATASTORE_TYPE", "etcdv3")
    return env


def _load(path: str) -> tuple[dict[str, Any], Mapping[str, str]]:
    """(netconf keys, environment) from a config file."""
    from calicoctl.documents import load_documents

    docs = load_documents(path)
    if len(docs) != 1:
        raise CommandError(f"config file {path} must hold exactly one document")
    doc = docs[0]
    if doc.get("kind") == "CalicoAPIConfig":
        return {}, environment_of(doc, path)
    return doc, {}


def settings_source(config_path: str | None) -> tuple[dict[str, Any], Mapping[str, str]]:
    """Where the datastore settings come from: the named file, the default file when it
    exists, else the environment."""
    if config_path:
        if not os.path.exists(config_path):
            raise CommandError(f"config file {config_path} does not exist")
        return _load(config_path)
    if os.path.exists(DEFAULT_CONFIG):
        return _load(DEFAULT_CONFIG)
    return {}, os.environ


def open_datastore(config_path: str | None) -> Datastore:
    """Open the configured datastore; DatastoreErrors propagate to the CLI."""
    from libcalico.datastore.config import DatastoreSettings

    conf, env = settings_source(config_path)
    return DatastoreSettings.resolve(conf, env).open()


def datastore_type(config_path: str | None) -> str:
    from libcalico.datastore.config import DatastoreSettings

    conf, env = settings_source(config_path)
    return DatastoreSettings.resolve(conf, env).type
