"""Choosing and opening the datastore, the way calicoctl and the CNI plugin choose it.

Netconf keys win, then the environment (`DATASTORE_TYPE`, `LOCAL_DATASTORE_PATH`,
`ETCD_ENDPOINTS`, `KUBECONFIG`, ...). Unlike real Calico, where nothing configured means Kubernetes,
nothing configured here means the embedded `local` SQLite datastore.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from libcalico.datastore.base import Datastore, InvalidDatastoreConfig

if TYPE_CHECKING:
    from libcalico.datastore.kept import KeptClients
    from libcalico.datastore.watch import Watcher
    from libcalico.model import ListOptions

DEFAULT_LOCAL_PATH = "/var/lib/calico/calico.db"
DEFAULT_ETCD = "http://127.0.0.1:2379"  # libcalico-go's default when no endpoint is set
_TYPES = ("local", "etcdv3", "kubernetes")
_ETCD_TLS_SETTINGS = ("etcd_scheme", "etcd_key_file", "etcd_cert_file", "etcd_ca_cert_file")


def _setting(conf: dict[str, Any], env: Mapping[str, str], name: str) -> str:
    """A netconf key (e.g. `etcd_cert_file`), else its environment variable (`ETCD_CERT_FILE`)."""
    return conf.get(name) or env.get(name.upper(), "")


_kept: KeptClients | None = None


@dataclass
class DatastoreSettings:
    type: str
    local_path: str = DEFAULT_LOCAL_PATH
    etcd_endpoints: str = ""
    etcd_scheme: str = ""
    etcd_key_file: str = ""
    etcd_cert_file: str = ""
    etcd_ca_cert_file: str = ""
    # The netconf's `kubernetes` and `policy` sections and the environment: the Kubernetes
    # client resolves its kubeconfig and overrides from them (k8s_client.KubeAccess).
    kube_conf: dict[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls, conf: dict[str, Any], environ: Mapping[str, str] | None = None
    ) -> DatastoreSettings:
        env = os.environ if environ is None else environ
        endpoints = _setting(conf, env, "etcd_endpoints")
        kind = _setting(conf, env, "datastore_type")
        if not kind:
            kind = "etcdv3" if endpoints else "local"
        if kind not in _TYPES:
            raise InvalidDatastoreConfig(
                f'unknown datastore_type "{kind}"', f"use one of {list(_TYPES)}"
            )
        return cls(
            type=kind,
            local_path=_setting(conf, env, "local_datastore_path") or DEFAULT_LOCAL_PATH,
            etcd_endpoints=endpoints,
            **{name: _setting(conf, env, name) for name in _ETCD_TLS_SETTINGS},
            kube_conf={k: conf[k] for k in ("kubernetes", "policy", "kubeconfig") if k in conf},
            environ=env,
        )

    def open(self) -> Datastore:
        """The backend for `type`; its DatastoreErrors reach the caller untranslated."""
        identity = self._identity() if _kept is not None else None
        if _kept is None or identity is None:
            return self.connect()
        return _kept.borrow(identity, self.connect)

    def watch(self, selections: Sequence[ListOptions]) -> Watcher:
        """A watcher of the `selections` in this datastore (libcalico/datastore/watch.py)."""
        if self.type == "local":
            from libcalico.datastore.local_watch import LocalWatcher

            return LocalWatcher(self.local_path, selections)
        if self.type == "etcdv3":
            from libcalico.datastore.etcd_watch import EtcdWatcher

            return EtcdWatcher(self, selections)
        from libcalico.datastore.kubernetes_watch import KubernetesWatcher

        return KubernetesWatcher(self, selections)

    def _identity(self) -> tuple[Any, ...] | None:
        """What a kept client must match (kept.py); None: never keep this one."""
        try:
            if self.type == "local":
                st = os.stat(self.local_path)
                return ("local", self.local_path, st.st_dev, st.st_ino)
            if self.type == "etcdv3":
                files = (self.etcd_cert_file, self.etcd_key_file, self.etcd_ca_cert_file)
                stamps = tuple(os.stat(f).st_mtime_ns if f else 0 for f in files)
                return ("etcdv3", self.etcd_endpoints, self.etcd_scheme, files, stamps)
        except OSError:
            return None  # opening reports the problem
        # Kubernetes credentials (tokens, exec kubeconfigs) change under a kept client.
        return None

    def connect(self) -> Datastore:
        """A new client of its own, never a kept one (a watch holds its connection)."""
        if self.type == "local":
            # Imported here so that range mode and the other verbs never load sqlite3.
            from libcalico.datastore.local import LocalDatastore

            return LocalDatastore(self.local_path)
        if self.type == "etcdv3":
            return self._open_etcd()
        return self._open_kubernetes()

    def _open_etcd(self) -> Datastore:
        """Connects lazily: the first request reaches the first endpoint that answers."""
        from libcalico.datastore.etcd import Endpoint, EtcdDatastore, TLSFiles

        urls = [url for url in self.etcd_endpoints.split(",") if url.strip()]
        endpoints = [Endpoint.parse(url, self.etcd_scheme) for url in urls or [DEFAULT_ETCD]]
        tls = TLSFiles(self.etcd_cert_file, self.etcd_key_file, self.etcd_ca_cert_file)
        return EtcdDatastore(endpoints, tls)

    def _open_kubernetes(self) -> Datastore:
        """Connects lazily; credentials from the kubeconfig and overrides (k8s_client.py)."""
        from libcalico.datastore.k8s_client import open_client
        from libcalico.datastore.kubernetes import KubernetesDatastore

        return KubernetesDatastore(open_client(self.kube_conf, self.environ))


def keep_clients_open() -> KeptClients:
    """From now on this process keeps datastore clients between opens (the node agent)."""
    global _kept
    from libcalico.datastore.kept import KeptClients

    if _kept is None:
        _kept = KeptClients()
    return _kept
