"""calico-node, the daemon: one per node, in the foreground, stopped by SIGTERM.

What runs, in order (as real calico-node's runit services do, in one process):
1. start-up (startup.py): the Node resource, ClusterInformation, the default pools, then
   the `nodename` file the CNI reads;
2. the CNI fast-path server (cni_server.py) on `CALICO_RUN_DIR/cni-agent.sock`;
3. the syncer (syncer.py): the datastore watch kept as a typed Snapshot, handed to the
   consumers, each in its own thread:
   - confd (confd/): BIRD's configuration rendered from the snapshot, BIRD (bird.py)
     started once there is one and reloaded when the text changes;
   - Felix-style dataplane managers (issue 13: VXLAN, routes, NAT, MTU);
4. the health endpoint (health.py) the `-felix-*` / `-bird-*` probes query.

Adding a Felix-style manager: subclass `syncer.Consumer` in its own module under
`calico_node/` (one per dataplane concern, pyroute2 for netlink), give it a `name`, a
`refresh_interval` if it repairs state on a timer, and an idempotent `apply(snapshot)` that
converges its concern to the snapshot (`snapshot.nodes`, `.pools`, `.blocks`,
`.affinities`, `.felix_configuration("default")` ...; `self.node.name` is this node);
`stop()` releases what it runs. Build it in `Daemon._consumers`, which passes it the
NodeContext. It may call `daemon.syncer.runner(name).kick()` (e.g. from a netlink monitor
thread) to be applied again. Its health counts towards `-felix-ready` automatically.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from calico_node.config import NodeConfig
from calico_node.paths import NodePaths
from calico_node.syncer import SELECTIONS, Consumer, Syncer
from libcalico.datastore.watch import open_watcher

log = logging.getLogger("calico-node")


@dataclass(frozen=True)
class NodeContext:
    """What every consumer knows of its own node after start-up."""

    name: str
    config: NodeConfig
    paths: NodePaths


class Daemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.paths = config.paths
        self._stopping = threading.Event()
        self.syncer: Syncer | None = None

    def _consumers(self, node: NodeContext) -> list[Consumer]:
        consumers: list[Consumer] = []
        if self.config.networking_backend == "bird":
            from calico_node.confd.consumer import Confd

            consumers.append(Confd(node))
        return consumers

    def request_stop(self, *_: object) -> None:
        self._stopping.set()

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        node = NodeContext(self.config.nodename, self.config, self.paths)
        watcher = open_watcher(self.config.datastore, SELECTIONS)
        self.syncer = Syncer(watcher, self._consumers(node))
        self.syncer.start()
        try:
            self._stopping.wait()
        finally:
            self.syncer.stop()
        return 0
