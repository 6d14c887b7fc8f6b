"""The calico plugin's etcd datastore as the CNI tests see it: seeded through the library,
read back as raw keys (what another Calico component would read), checked with the admin
CLI an operator would run, reached from inside node netns, restarted and counted."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_plugin.dataplane.netns import entered, open_netns
from libcalico.datastore.base import KVPair, NotFound
from libcalico.datastore.etcd import EtcdDatastore
from libcalico.model import (
    ClusterInformation,
    IPPool,
    IPPoolSpec,
    ObjectMeta,
    ResourceKey,
)
from tests.etcd_fixture import EtcdCluster, EtcdMember
from tests.harness import Netns, calico_cli, calico_conf

NETWORK = "k8s-pod-network"
RESOURCES = "/calico/resources/v3/projectcalico.org"
ENDPOINTS = f"{RESOURCES}/workloadendpoints/"
HANDLES = "/calico/ipam/v2/handle/"
BLOCKS = "/calico/ipam/v2/assignment/"


def endpoint_key(node: str, pod: str, namespace: str = "default") -> str:
    """calico-behaviour.md §3.2: dashes doubled in each segment, segments joined by one."""
    name = "-".join(s.replace("-", "--") for s in (node, "k8s", pod, "eth0"))
    return f"{ENDPOINTS}{namespace}/{name}"


@dataclass
class EtcdCalico:
    """One etcd cluster holding Calico's data, and the ways a test reaches it."""

    cluster: EtcdCluster
    lock_dir: Path

    def conf(self, version: str = "1.0.0", node: str = "node1", **extra: Any) -> dict[str, Any]:
        """The calico + calico-ipam netconf for `node`; each node has its own IPAM lock."""
        return calico_conf(
            version,
            {"type": "calico-ipam"},
            nodename=node,
            ipam_lock_file=str(self.lock_dir / f"ipam-{node}.lock"),
            **self.cluster.netconf(),
            **extra,
        )

    # ---------------------------------------------------------------- seeding

    def open(self) -> EtcdDatastore:
        return self.cluster.open_store()

    def add_pool(self, name: str, cidr: str, **spec: Any) -> None:
        pool = IPPool(ObjectMeta(name), IPPoolSpec.from_json({"cidr": cidr, **spec}))
        with self.open() as store:
            store.create(KVPair(ResourceKey("IPPool", name), pool))

    def set_datastore_ready(self, ready: bool) -> None:
        """What calico/node does around an upgrade: ClusterInformation `default`."""
        key = ResourceKey("ClusterInformation", "default")
        info = ClusterInformation(ObjectMeta("default"), {"datastoreReady": ready})
        with self.open() as store:
            try:
                current = store.get(key)
            except NotFound:
                store.create(KVPair(key, info))
            else:
                store.update(KVPair(key, info, current.revision))

    # ------------------------------------------------------------ reading back

    def rows(self, prefix: str = "/calico/") -> dict[str, Any]:
        """Every key under `prefix` with its JSON value, as stored."""
        return self.cluster.raw_json(prefix)

    def handles(self) -> list[str]:
        return sorted(key.removeprefix(HANDLES) for key in self.cluster.raw_items(HANDLES))

    def endpoints(self) -> dict[str, Any]:
        return self.rows(ENDPOINTS)

    def allocations(self) -> dict[str, str]:
        """Every allocated address → its handle, over all blocks."""
        import ipaddress

        owners = {}
        for block in self.rows(BLOCKS).values():
            network = ipaddress.ip_network(block["cidr"])
            for ordinal, index in enumerate(block["allocations"]):
                if index is not None:
                    handle = block["attributes"][index]["handle_id"]
                    owners[str(network[ordinal])] = handle
        return owners

    def block_affinities(self) -> dict[str, str | None]:
        """Block CIDR → its `affinity` (`host:<node>`, or None once released)."""
        return {block["cidr"]: block.get("affinity") for block in self.rows(BLOCKS).values()}

    def assert_nothing_allocated(self) -> None:
        assert self.allocations() == {}
        assert self.handles() == []
        assert self.endpoints() == {}

    # ---------------------------------------------------------- the admin CLI

    def ctl(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """`calico <argv>` with calicoctl's environment pointing at this etcd."""
        env = {"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": self.cluster.endpoints}
        if self.cluster.tls:
            env.update(
                ETCD_CA_CERT_FILE=self.cluster.tls.ca_cert,
                ETCD_CERT_FILE=self.cluster.tls.client_cert,
                ETCD_KEY_FILE=self.cluster.tls.client_key,
            )
        return calico_cli(*argv, env=env, stdin=stdin)

    def assert_ipam_consistent(self) -> None:
        """`calico ipam check` finds no leaked IP, miscounted handle or stray affinity."""
        check = self.ctl("ipam", "check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "Check complete; found 0 problems." in check.stdout


def kv_requests(member: EtcdMember) -> int:
    """Requests etcd's KV service has handled, from its own Prometheus metrics: every
    gateway POST becomes exactly one gRPC Range or Txn, so a difference is round trips."""
    conn = http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{")
        and 'grpc_service="etcdserverpb.KV"' in line
    )


@dataclass
class LoopbackRelay:
    """Makes etcd's 127.0.0.1:<port> reachable on 127.0.0.1:<port> inside node netns.

    The plugin runs inside a node netns, whose loopback is not the test's; a listening
    socket created while a thread is inside the node netns stays there, and the relay
    copies bytes to the test's loopback. Same address and port, so netconf endpoints and
    the TLS server name work unchanged. When etcd is down the relay resets the accepted
    connection, which the plugin meets as a refused/broken connection.
    """

    ports: list[int]
    netns_paths: list[str]
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _servers: list[asyncio.Server] = field(default_factory=list)

    def __enter__(self) -> LoopbackRelay:
        listeners = [self._listen(path, port) for path in self.netns_paths for port in self.ports]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(listeners, ready), daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join()

    def add_netns(self, netns_path: str) -> None:
        """Relay into one more netns too (a node added while the relay runs)."""
        for sock in [self._listen(netns_path, port) for port in self.ports]:
            asyncio.run_coroutine_threadsafe(self._start(sock), self._loop).result()

    async def _start(self, sock: socket.socket) -> None:
        relay = self._relay_to(sock.getsockname()[1])
        self._servers.append(await asyncio.start_server(relay, sock=sock))

    @staticmethod
    def _listen(netns_path: str, port: int) -> socket.socket:
        fd = open_netns(netns_path)
        try:
            with entered(fd):
                listener = socket.create_server(("127.0.0.1", port), backlog=512)
        finally:
            os.close(fd)
        listener.setblocking(False)
        return listener

    def _serve(self, listeners: list[socket.socket], ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        for sock in listeners:
            self._loop.run_until_complete(self._start(sock))
        ready.set()
        self._loop.run_forever()
        for server in self._servers:
            server.close()
        self._loop.close()

    @staticmethod
    def _relay_to(port: int) -> Any:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.transport.abort()  # a reset: as close to "refused" as a relay gets
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return relay


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends, then end the other (keep-alive ends with etcd)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.contextmanager
def reachable_from(cluster: EtcdCluster, *netns: Netns) -> Iterator[None]:
    """While open, every member of `cluster` answers on its own address inside `netns`."""
    ports = [member.client_port for member in cluster.members]
    with LoopbackRelay(ports, [ns.path for ns in netns]):
        yield
