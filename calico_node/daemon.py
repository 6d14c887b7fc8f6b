"""calico-node, the daemon: one per node, in the foreground, stopped by SIGTERM.

What runs, in order (as real calico-node's runit services do, in one process):
1. the health endpoint (health.py) the `-felix-*` probes query (not ready until the end);
2. start-up (startup.py): the Node resource, ClusterInformation, the default pools, then
   the `nodename` file the CNI reads; a datastore not reachable yet is waited for;
3. the CNI fast-path server (cni_server.py) on `CALICO_RUN_DIR/cni-agent.sock`;
4. the syncer (syncer.py): the datastore watch kept as a typed Snapshot, handed to the
   consumers, each in its own thread:
   - confd (confd/): BIRD's configuration rendered from the snapshot, BIRD (bird.py)
     started once there is one and reloaded when the text changes;
   - the tunnel addresses (allocateip.py): the node's VXLAN/IPIP addresses from IPAM;
   - Felix (felix/): the dataplane (VXLAN devices and peers, routes, natOutgoing, the
     MTU file), re-checked on netlink events and every refresh interval.

Adding a Felix-style manager: subclass `syncer.Consumer` in its own module under
`calico_node/` (one per dataplane concern, pyroute2 for netlink), give it a `name`, a
`refresh_interval` if it repairs state on a timer, and an idempotent `apply(snapshot)` that
converges its concern to the snapshot (`snapshot.nodes`, `.pools`, `.blocks`,
`.affinities`, `.felix_configuration("default")` ...; `self.node.name` is this node);
`stop()` releases what it runs. Build it in `Daemon._consumers`, which passes it the
NodeContext. It may call `self.request_apply()` (e.g. from a netlink monitor thread) to
be applied again. Its health counts towards `-felix-ready` automatically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from calico_node import instance, startup
from calico_node.config import NodeConfig
from calico_node.context import NodeContext
from calico_node.health import HealthServer, Status
from calico_node.syncer import SELECTIONS, Consumer, Syncer
from libcalico.datastore.base import DatastoreError, DatastoreUnavailable

log = logging.getLogger("calico-node")

STARTUP_RETRY_S = (0.5, 5.0)


class DaemonError(Exception):
    """calico-node cannot run; one line, exit 1."""


class Daemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.paths = config.paths
        self._stopping = threading.Event()
        self.syncer: Syncer | None = None
        self.nodename = ""

    def _consumers(self, node: NodeContext) -> list[Consumer]:
        from calico_node.allocateip import TunnelAddresses
        from calico_node.felix.dataplane import Felix

        consumers: list[Consumer] = [TunnelAddresses(node), Felix(node)]
        if self.config.networking_backend == "bird":
            from calico_node.confd.consumer import Confd

            consumers.append(Confd(node))
        else:
            log.info(
                "CALICO_NETWORKING_BACKEND is %s - no need to run a BGP daemon",
                self.config.networking_backend,
            )
        return consumers

    def request_stop(self, *_: object) -> None:
        self._stopping.set()

    # -- start-up

    def _register(self) -> startup.Registration:
        """Start-up, waiting out a datastore that is not reachable yet."""
        delay = STARTUP_RETRY_S[0]
        while True:
            try:
                with self.config.datastore.open() as store:
                    return startup.run(store, self.config, self._kubernetes_internal_ip)
            except DatastoreUnavailable as err:
                log.warning("datastore not reachable (%s); retrying in %.1fs", err, delay)
            except DatastoreError as err:
                raise DaemonError(f"calico-node start-up failed: {err}") from err
            except startup.StartupError as err:
                raise DaemonError(str(err)) from err
            if self._stopping.wait(delay):
                raise DaemonError("stopped during start-up")
            delay = min(delay * 2, STARTUP_RETRY_S[1])

    def _kubernetes_internal_ip(self) -> str:
        """The Kubernetes Node's InternalIP (IP_AUTODETECTION_METHOD=kubernetes-internal-ip)."""
        if self.config.datastore.type != "kubernetes":
            return ""
        from libcalico.datastore.k8s_client import open_client

        name = startup.determine_nodename(self.config)
        with open_client({}, self.config.datastore.environ) as client:
            node = client.get(f"/api/v1/nodes/{name}")
        addresses = (node.get("status") or {}).get("addresses") or []
        return next((a["address"] for a in addresses if a.get("type") == "InternalIP"), "")

    # -- health

    def status(self) -> Status:
        reasons = []
        syncer = self.syncer
        live = syncer is not None and syncer.alive()
        if syncer is None:
            reasons.append("starting up")
        else:
            # A datastore outage makes the node not ready, never not live: a restart
            # would not bring the datastore back.
            if not syncer.alive():
                reasons.append("the datastore watch or a consumer thread died")
            if not syncer.in_sync:
                reasons.append("not in sync with the datastore")
            for runner in syncer.runners:
                if not runner.healthy:
                    reasons.append(
                        f"{runner.consumer.name}: {runner.last_error or 'not applied yet'}"
                    )
        return Status(
            live=live, ready=live and not reasons, reasons=reasons, nodename=self.nodename
        )

    # -- the run

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        try:
            lock_fd = instance.hold(self.paths.daemon_lock)
        except instance.AlreadyRunning:
            raise DaemonError(f"calico-node is already running for {self.paths.run_dir}") from None
        health = HealthServer(self.paths.health_socket, self.status)
        try:
            health.start()
            registration = self._register()
            self.nodename = registration.nodename
            log.info("Start-up complete for node %s", self.nodename)
            self._serve(NodeContext(self.nodename, self.config, self.paths))
        finally:
            health.stop()
            with contextlib.suppress(FileNotFoundError):
                self.paths.daemon_lock.unlink()  # while still holding it: no race with a successor
            os.close(lock_fd)
        log.info("calico-node stopped")
        return 0

    def _serve(self, node: NodeContext) -> None:
        from calico_node import cni_server
        from libcalico.datastore.config import keep_clients_open

        cni_server.prepare_process()
        kept = keep_clients_open()
        agent = cni_server.Agent(str(self.paths.cni_socket))
        try:
            agent.bind()
        except cni_server.ServeError as err:
            kept.close()
            raise DaemonError(str(err)) from err
        serving = threading.Thread(target=agent.serve, name="cni-server", daemon=True)
        serving.start()
        watcher = self.config.datastore.watch(SELECTIONS)
        self.syncer = Syncer(watcher, self._consumers(node))
        try:
            self.syncer.start()
            self._stopping.wait()
            log.info("stopping")
        finally:
            agent.request_stop()
            serving.join(cni_server.DEFAULT_DRAIN_S + 5)
            self.syncer.stop()
            kept.close()
