"""calico-node benchmarks: route convergence against BIRD's own propagation, and a cold
start of 20 simulated nodes in full mesh and with 2 route reflectors.

Convergence, side by side in one run, trials interleaved:
  (floor) BIRD alone: a blackhole route added by hand on node1 (inside a pool, so BIRD
          exports it) until it is in node2's and node3's kernels: BIRD's learn, BGP, and
          the peers' kernel programming; nothing of ours.
  (ours)  a pod's ADD on node1 (through its calico-node) in a pool of its own, so a new
          block, until that block's route is in node2's and node3's kernels: the CNI ADD,
          the IPAM write, the datastore watch, confd's render and `bird -p`, BIRD's reload,
          then the same path as the floor.
Arrival is seen on each peer's netlink route group, not by polling `ip route`.

Scale: 20 nodes on the local datastore, each with one block claimed beforehand (IPAM
engine), every calico-node started at once; time until every BGP session is up and every
node has its routes; then each daemon's and each BIRD's idle RSS and CPU over a window.

Run as root after `make build`: .venv/bin/python bench/node_bench.py [-n 20] [--nodes 20]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_bench import REPO, BenchFailure, Report, Row, percentile, publish, raise_on_sigterm

sys.path.insert(0, str(REPO))

from cni_plugin.dataplane.netns import entered
from ipam_plugin.engine import IPAM, AutoAssignRequest
from libcalico.datastore.base import KVPair
from libcalico.model import (
    BGPConfiguration,
    BGPPeer,
    Node,
    ObjectMeta,
    ResourceKey,
)
from tests.node.cluster import Cluster, SimNode, processes_under

RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE = 24
RTA_DST = 1
WAIT_S = 120.0


class RouteArrivals:
    """When each IPv4 route first appeared in one netns (its netlink route group)."""

    def __init__(self, netns_path: str) -> None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with entered(fd):
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        finally:
            os.close(fd)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, RTMGRP_IPV4_ROUTE))
        self.seen: dict[str, float] = {}
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                return
            now = time.monotonic()
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind == RTM_NEWROUTE:
                    dst = self._dst(data[offset + 16 : offset + length])
                    if dst:
                        with self._changed:
                            self.seen.setdefault(dst, now)
                            self._changed.notify_all()
                offset += (length + 3) & ~3

    @staticmethod
    def _dst(body: bytes) -> str:
        family, dst_len = body[0], body[1]
        if family != socket.AF_INET:
            return ""
        pos = 12
        while pos + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, pos)
            if alen < 4:
                return ""
            if atype == RTA_DST:
                return f"{socket.inet_ntoa(body[pos + 4 : pos + 8])}/{dst_len}"
            pos += (alen + 3) & ~3
        return f"0.0.0.0/{dst_len}"

    def wait(self, dst: str, timeout: float = WAIT_S) -> float:
        deadline = time.monotonic() + timeout
        with self._changed:
            while dst not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchFailure(f"route {dst} never arrived")
                self._changed.wait(left)
            return self.seen[dst]

    def close(self) -> None:
        self._sock.close()


def block_of(ip: str, size: int = 26) -> str:
    return str(ipaddress.ip_network(f"{ip}/{size}", strict=False))


# ------------------------------------------------------------------ convergence


@dataclass
class Convergence:
    floor_ms: list[float] = field(default_factory=list)
    ours_ms: list[float] = field(default_factory=list)
    add_ms: list[float] = field(default_factory=list)


def converge_trials(trials: int) -> Convergence:
    cluster = Cluster.local()
    result = Convergence()
    watches: list[RouteArrivals] = []
    try:
        nodes = [cluster.add_node() for _ in range(3)]
        cluster.add_pool("floor", "10.250.0.0/16", blockSize=26)
        for i in range(trials):
            cluster.add_pool(f"conv{i}", f"10.{100 + i}.0.0/24", blockSize=26)
        cluster.wait(lambda: all(len(cluster.established(n)) == 2 for n in nodes), "the mesh")
        # Let every node render the new pools before timing anything.
        cluster.wait(
            lambda: all(
                f"10.{99 + trials}.0.0/24"
                in n.confd_dir.joinpath("config", "bird_ipam.cfg").read_text()
                for n in nodes
            ),
            "the pools rendered",
        )
        time.sleep(1.0)
        watches = [RouteArrivals(n.netns.path) for n in nodes[1:]]
        for i in range(trials):
            floor_dst = f"10.250.{i}.0/26"
            start = time.monotonic()
            subprocess.run(
                ["ip", "-n", nodes[0].netns.name, "route", "add", "blackhole", floor_dst],
                check=True,
            )
            result.floor_ms.append((max(w.wait(floor_dst) for w in watches) - start) * 1000)

            start = time.monotonic()
            pod = nodes[0].add_pod({"type": "calico-ipam", "ipv4_pools": [f"conv{i}"]})
            added = time.monotonic()
            block = block_of(pod.ip)
            result.ours_ms.append((max(w.wait(block) for w in watches) - start) * 1000)
            result.add_ms.append((added - start) * 1000)
            time.sleep(0.3)  # let the reload settle: trials do not overlap
        return result
    finally:
        for watch in watches:
            watch.close()
        cluster.destroy()


# ------------------------------------------------------------------ scale


@dataclass
class Scale:
    nodes: int
    sessions: int = 0
    sessions_s: float = 0.0
    converged_s: float = 0.0
    daemon_rss_mib: list[float] = field(default_factory=list)
    daemon_cpu_pct: list[float] = field(default_factory=list)
    bird_rss_mib: list[float] = field(default_factory=list)
    bird_cpu_pct: list[float] = field(default_factory=list)


def _proc_sample(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = next(
        int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return cpu, rss


def _idle(pids: list[int], window_s: float) -> tuple[list[float], list[float]]:
    """Each process's CPU % over `window_s` and its RSS at the end."""
    before = [_proc_sample(pid)[0] for pid in pids]
    time.sleep(window_s)
    after = [_proc_sample(pid) for pid in pids]
    cpu = [(a[0] - b) / window_s * 100 for a, b in zip(after, before, strict=True)]
    return cpu, [a[1] for a in after]


def _prepare(cluster: Cluster, names: list[str], reflectors: list[str]) -> None:
    """The datastore as a cluster would have it: the pool, each node's block, and for the
    RR run the reflectors' labels and cluster ID, the BGPPeer and the mesh off."""
    cluster.add_pool("default-ipv4-ippool", cluster.pool_cidr, blockSize=26)
    with cluster.store() as store:
        for name in names:
            labels = {"route-reflector": "true"} if name in reflectors else {}
            spec = {"bgp": {"routeReflectorClusterID": "1.1.1.1"}} if name in reflectors else {}
            store.create(KVPair(ResourceKey("Node", name), Node(ObjectMeta(name, labels), spec)))
            request = AutoAssignRequest(f"bench-{name}", name, {"node": name})
            IPAM(store).auto_assign(request)
        if reflectors:
            peer = {"nodeSelector": "all()", "peerSelector": 'route-reflector == "true"'}
            store.create(KVPair(ResourceKey("BGPPeer", "rr"), BGPPeer(ObjectMeta("rr"), peer)))
            config = {"nodeToNodeMeshEnabled": False}
            store.create(
                KVPair(
                    ResourceKey("BGPConfiguration", "default"),
                    BGPConfiguration(ObjectMeta("default"), config),
                )
            )


def cold_start(count: int, reflectors: int, idle_s: float) -> Scale:
    cluster = Cluster.local(subnet="172.31.0.0/16")
    names = [f"node{i + 1}" for i in range(count)]
    rr_names = names[:reflectors]
    result = Scale(count)
    try:
        _prepare(cluster, names, rr_names)
        nodes = [cluster.add_node(name, start=False) for name in names]

        def wanted(node: SimNode) -> int:
            if not reflectors:
                return count - 1
            return count - 1 if node.name in rr_names else reflectors

        start = time.monotonic()
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_started()
        cluster.wait(
            lambda: all(len(cluster.established(n)) == wanted(n) for n in nodes), "sessions", 300
        )
        result.sessions_s = time.monotonic() - start
        cluster.wait(lambda: not cluster.routing_problems(), "routes", 300)
        result.converged_s = time.monotonic() - start
        result.sessions = sum(len(cluster.established(n)) for n in nodes) // 2
        time.sleep(5.0)  # past start-up's bursts
        daemons = [n.proc.pid for n in nodes if n.proc is not None]
        birds = [pid for n in nodes if (pid := n.bird_pid()) is not None]
        cpu, rss = _idle(daemons + birds, idle_s)
        result.daemon_cpu_pct, result.bird_cpu_pct = cpu[: len(daemons)], cpu[len(daemons) :]
        result.daemon_rss_mib, result.bird_rss_mib = rss[: len(daemons)], rss[len(daemons) :]
        for node in nodes:
            if node.stop() != 0:
                raise BenchFailure(f"{node.name} did not stop cleanly")
            if node.bird_pid() is not None:
                raise BenchFailure(f"{node.name}'s BIRD outlived its daemon")
        return result
    finally:
        cluster.destroy()
        left = processes_under(cluster.home)
        if left:
            raise BenchFailure(f"processes left: {left}")


# ------------------------------------------------------------------ report


def report(conv: Convergence, scales: list[Scale], settings: dict[str, Any]) -> Report:
    out = Report(
        "node_bench",
        {"floor": "BIRD alone: route added on node1 -> peers' kernels",
         "ours": "pod ADD on node1 -> its new block in peers' kernels"},
        settings,
    )  # fmt: skip
    for label, q in (("p50", 50), ("p90", 90), ("min", 0), ("max", 100)):
        out.rows.append(
            Row(f"convergence {label}", "ms",
                {"floor": percentile(conv.floor_ms, q), "ours": percentile(conv.ours_ms, q)})
        )  # fmt: skip
    out.rows.append(Row("of which the CNI ADD, p50", "ms", {"ours": percentile(conv.add_ms, 50)}))
    for scale, title in zip(scales, ("mesh", "2 RRs"), strict=True):
        prefix = f"{scale.nodes} nodes, {title}:"
        out.notes.append(
            f"{prefix} {scale.sessions} BGP sessions up after {scale.sessions_s:.1f} s, "
            f"every route in place after {scale.converged_s:.1f} s (every daemon started at once)"
        )
        rss, cpu = scale.daemon_rss_mib, scale.daemon_cpu_pct
        out.notes.append(
            f"{prefix} idle calico-node RSS max {max(rss):.1f} MiB (median "
            f"{percentile(rss, 50):.1f}), CPU max {max(cpu):.2f}% (median "
            f"{percentile(cpu, 50):.2f}%); BIRD RSS max {max(scale.bird_rss_mib):.1f} MiB, "
            f"CPU max {max(scale.bird_cpu_pct):.2f}%"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--trials", type=int, default=20, help="convergence trials")
    parser.add_argument("--nodes", type=int, default=20, help="nodes of the scale runs")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="idle sampling window")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("node_bench needs root (network namespaces, BIRD)", file=sys.stderr)
        return 1
    raise_on_sigterm()

    def run() -> Report:
        conv = converge_trials(opts.trials)
        scales = [
            cold_start(opts.nodes, 0, opts.idle_seconds),
            cold_start(opts.nodes, 2, opts.idle_seconds),
        ]
        return report(conv, scales, vars(opts))

    return publish("node_bench", "node", run)


if __name__ == "__main__":
    sys.exit(main())
