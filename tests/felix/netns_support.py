"""Running Felix's managers in-process inside a test netns, and the cluster data they read.

A network namespace belongs to a thread: `NetnsThread` is one worker thread that entered
the netns before anything ran (and threads it starts, such as a consumer runner's or the
netlink monitor's, start there too), so netlink sockets and the iptables/ipset commands it
spawns act on the test netns only. It refuses to run anything if the switch did not take.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from calico_node.config import NodeConfig
from calico_node.context import NodeContext
from calico_node.syncer import SELECTIONS, Snapshot
from libcalico.datastore.base import Datastore
from libcalico.model import (
    AllocationBlock,
    FelixConfiguration,
    IPPool,
    IPPoolSpec,
    Node,
    ObjectMeta,
)
from tests.harness import Netns, sh

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
HOST_NETNS = os.stat("/proc/self/ns/net").st_ino


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class NetnsThread:
    def __init__(self, netns: Netns) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(1, initializer=_enter, initargs=(netns.path,))
        inode = self.run(lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert inode != HOST_NETNS, "the worker thread did not enter the test netns"

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 120) -> T:
        return self._pool.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def node_context(name: str, lib_dir: Path, env: dict[str, str] | None = None) -> NodeContext:
    environ = {
        "CALICO_LIB_DIR": str(lib_dir),
        "CALICO_RUN_DIR": str(lib_dir / "run"),
        "DATASTORE_TYPE": "local",
        "LOCAL_DATASTORE_PATH": str(lib_dir / "calico.db"),
        "CALICO_NETWORKING_BACKEND": "vxlan",
        **(env or {}),
    }
    config = NodeConfig.from_env(environ)
    return NodeContext(name, config, config.paths)


def pool(name: str, cidr: str, **spec: Any) -> IPPool:
    return IPPool(ObjectMeta(name), IPPoolSpec.from_json({"cidr": cidr, **spec}))


def node(name: str, address: str, **spec: Any) -> Node:
    bgp = {"ipv4Address": address} if ":" not in address else {"ipv6Address": address}
    bgp.update(spec.pop("bgp", {}))
    return Node(ObjectMeta(name, spec.pop("labels", {})), {"bgp": bgp, **spec})


def block(cidr: str, host: str | None, **allocated: str) -> AllocationBlock:
    """A block affine to `host`; `allocated` maps ordinals ("o5") to the node that took
    them (a borrowed IP when it is not `host`)."""
    network = ipaddress.ip_network(cidr)
    b = AllocationBlock.new(network, f"host:{host}" if host else None, "", 0)
    for ordinal, owner in allocated.items():
        b.assign(int(ordinal[1:]), f"h-{ordinal}-{owner}", {"node": owner})
    return b


def snapshot(
    nodes: Iterable[Node] = (),
    pools: Iterable[IPPool] = (),
    blocks: Iterable[AllocationBlock] = (),
    felix: dict[str, dict[str, Any]] | None = None,
    generation: int = 1,
) -> Snapshot:
    return Snapshot(
        nodes=MappingProxyType({n.metadata.name: n for n in nodes}),
        pools=MappingProxyType({p.name: p for p in pools}),
        blocks=MappingProxyType({b.cidr: b for b in blocks}),
        felix_configurations=MappingProxyType(
            {k: FelixConfiguration(ObjectMeta(k), v) for k, v in (felix or {}).items()}
        ),
        generation=generation,
        in_sync=True,
    )


def store_snapshot(store: Datastore, generation: int = 1) -> Snapshot:
    """The snapshot the syncer would build from `store` now."""
    pairs = [kvp for options in SELECTIONS for kvp in store.list(options)]
    return Snapshot.from_pairs(pairs, generation)


def underlay(node_ns: Netns, peer_ns: Netns, address: str, peer_address: str) -> None:
    """`eth0` in `node_ns` with `address`, its peer in `peer_ns`, and a default route."""
    peer = f"p{os.urandom(4).hex()}"
    sh("ip", "-n", node_ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", peer,
       "netns", peer_ns.name)  # fmt: skip
    sh("ip", "-n", node_ns.name, "addr", "add", address, "dev", "eth0")
    sh("ip", "-n", node_ns.name, "link", "set", "eth0", "up")
    sh("ip", "-n", peer_ns.name, "addr", "add", peer_address, "dev", peer)
    sh("ip", "-n", peer_ns.name, "link", "set", peer, "up")
