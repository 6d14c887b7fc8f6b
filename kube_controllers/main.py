"""`calico-kube-controllers`: the cluster's Calico controllers, one process per cluster.

Configured as Calico's Deployment configures it: `DATASTORE_TYPE=kubernetes`, the API
server from `KUBECONFIG` (or the pod's service account), `ENABLED_CONTROLLERS` (default:
the controllers the KubeControllersConfiguration `default` lists), `LOG_LEVEL`. Of
Calico's controllers this runs the node controller's IPAM garbage collection
(ipam_gc.py); the configuration is re-read every scan, so an operator's change of
`leakGracePeriod` applies at once. Runs in the foreground until SIGTERM or SIGINT; an
unreachable API server is logged and retried, never fatal.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping

from kube_controllers import config
from kube_controllers.ipam_gc import IPAMGarbageCollector
from libcalico.datastore.base import DatastoreError
from libcalico.datastore.k8s_client import open_client
from libcalico.datastore.kubernetes import KubernetesDatastore
from libcalico.workloads import KubernetesWorkloads

RETRY_INTERVAL = 2.0
log = logging.getLogger("kube-controllers")


class Controllers:
    """The scan loop: settings, then one garbage-collection pass, then a wait."""

    def __init__(self, store: KubernetesDatastore, environ: Mapping[str, str]) -> None:
        self.store = store
        self.environ = environ
        self.gc = IPAMGarbageCollector(store, KubernetesWorkloads(store.client))
        self.stopping = threading.Event()
        self._level = ""

    def run(self) -> None:
        log.info("Starting the Calico controllers")
        while not self.stopping.is_set():
            self.stopping.wait(self.step())
        log.info("Stopped the Calico controllers")

    def step(self) -> float:
        """One pass; returns how long to wait before the next."""
        try:
            settings = config.load(self.store, self.environ)
            self._apply_log_level(settings.log_level)
            if settings.node_controller:
                report = self.gc.scan(settings.leak_grace)
                log.debug(
                    "IPAM garbage collection pass done",
                    extra={"fields": {"candidates": report.candidates}},
                )
            return settings.scan_interval
        except config.ConfigError as err:
            log.error("KubeControllersConfiguration default: %s", err)
        except DatastoreError as err:
            log.warning("Calico datastore unavailable, retrying: %s", err)
        return RETRY_INTERVAL

    def _apply_log_level(self, level: str) -> None:
        if level != self._level:
            logging.getLogger().setLevel(logging.getLevelName(level.upper()))
            self._level = level


def main(argv: list[str]) -> int:
    from cni_plugin.logs import setup

    parser = argparse.ArgumentParser(
        prog="calico-kube-controllers",
        description="Calico's cluster controllers (IPAM garbage collection).",
    )
    parser.parse_args(argv)
    setup("kube-controllers", os.environ.get("LOG_LEVEL", "info").lower())
    environ = dict(os.environ)
    if environ.get("DATASTORE_TYPE", "kubernetes") != "kubernetes":
        print(
            "calico-kube-controllers: only DATASTORE_TYPE=kubernetes is supported "
            f"(got {environ['DATASTORE_TYPE']!r})",
            file=sys.stderr,
        )
        return 1
    try:
        store = KubernetesDatastore(open_client({}, environ))
    except DatastoreError as err:
        print(f"calico-kube-controllers: {err}", file=sys.stderr)
        return 1
    controllers = Controllers(store, environ)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: controllers.stopping.set())
    try:
        controllers.run()
    finally:
        store.close()
    return 0
