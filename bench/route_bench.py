"""Route programming: 1,000 remote VXLAN blocks from cold, and the cost of one more,
against a bare netlink batch of the same routes measured in the same run (the floor).

In a node netns of its own (eth0 and a VXLAN device, 50 remote nodes of 20 blocks each):
  (floor)  the 1,000 `<block> via <vtep> dev vxlan.calico onlink` routes encoded with
           struct and sent as one rtnetlink batch, ACKs read: no library, no reading back;
  (routes) Felix's route manager (the kernel read, a pyroute2 batch) given the same
           routes into an empty table;
  (pass)   a whole Felix pass on a fresh consumer: the model from the snapshot, the device,
           50 FDB and neighbour entries, the routes, the nat chains, the mtu file.
"One more" adds one block to 1,000 in place: the floor sends one route; the manager and the
pass plan against what they last wrote (no kernel change was signalled) and send one.
Repetitions are interleaved; the table shows the median and the minimum.

Run as root: .venv/bin/python bench/route_bench.py [-n 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import socket
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cni_bench import BenchFailure, Report, Row, publish

from calico_node.felix import netlink
from calico_node.felix.dataplane import Felix
from calico_node.felix.model import VXLAN_DEVICE, Route
from calico_node.felix.routes import RouteManager
from tests.felix.netns_support import (
    NetnsThread,
    block,
    node,
    node_context,
    pool,
    snapshot,
    underlay,
)
from tests.harness import Netns, sh

NODES, BLOCKS_PER_NODE = 50, 20  # 1,000 remote blocks
POOL = "10.96.0.0/12"
RTM_NEWROUTE, NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE = 24, 1, 4, 0x400, 0x100
NLMSG_ERROR = 2
SO_RCVBUFFORCE, SOL_NETLINK, NETLINK_CAP_ACK = 33, 270, 10


def cluster_snapshot(extra_block: bool = False, generation: int = 1):
    nodes = [node("me", "172.31.7.2/24", ipv4VXLANTunnelAddr="10.96.0.0")]
    blocks = [block("10.96.0.0/26", "me")]
    for n in range(1, NODES + 1):
        name = f"n{n}"
        base = ipaddress.ip_network(POOL).network_address + n * 64 * 64
        nodes.append(node(name, f"172.31.{8 + n // 250}.{n % 250 + 1}/16",
                          ipv4VXLANTunnelAddr=str(base)))  # fmt: skip
        blocks += [block(f"{base + i * 64}/26", name) for i in range(BLOCKS_PER_NODE)]
    if extra_block:
        blocks.append(block("10.111.255.192/26", "n1"))
    return snapshot(nodes, [pool("vx", POOL, vxlanMode="Always")], blocks, generation=generation)


def bare_batch(routes: list[Route], oif: int) -> None:
    """The floor: RTM_NEWROUTE x N in one send(), then the N ACKs."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    try:
        # Room for every ACK at once, each without a copy of its request.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        body = bytearray()
        for seq, route in enumerate(routes, 1):
            attrs = b"".join(
                struct.pack("HH", 4 + len(v), kind) + v
                for kind, v in (
                    (1, route.dst.network_address.packed),
                    (5, route.gateway.packed),  # type: ignore[union-attr]
                    (4, struct.pack("I", oif)),
                )
            )
            rtm = struct.pack("BBBBBBBBI", 2, route.dst.prefixlen, 0, 0, 254, 3, 0, 1, 4)
            flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
            body += struct.pack("IHHII", 16 + len(rtm) + len(attrs), RTM_NEWROUTE, flags, seq, 0)
            body += rtm + attrs
        sock.send(bytes(body))
        acked = 0
        while acked < len(routes):
            data = sock.recv(1 << 20)
            offset = 0
            while offset < len(data):
                length, kind = struct.unpack_from("IH", data, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("i", data, offset + 16)
                    if code:
                        raise BenchFailure(f"bare netlink batch: error {code}")
                    acked += 1
                offset += (length + 3) & ~3
    finally:
        sock.close()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def run(rounds: int) -> Report:
    ns, fabric = Netns.create("rb-node"), Netns.create("rb-fab")
    home = Path(tempfile.mkdtemp(prefix="route-bench-"))
    worker = None
    try:
        underlay(ns, fabric, "172.31.7.2/16", "172.31.7.1/16")
        worker = NetnsThread(ns)
        context = node_context("me", home, {"CALICO_NETWORKING_BACKEND": "vxlan"})
        cold_snap, more_snap = cluster_snapshot(), cluster_snapshot(True, 2)
        times: dict[tuple[str, str], list[float]] = {}

        def record(key: tuple[str, str], ms: float) -> None:
            times.setdefault(key, []).append(ms)

        def flush_routes() -> None:
            sh("ip", "-n", ns.name, "route", "flush", "dev", VXLAN_DEVICE[4])
            sh("ip", "-n", ns.name, "route", "flush", "proto", "80")

        def one_round() -> None:
            # (pass) a fresh consumer on a host with nothing: cold, then one more block.
            sh("ip", "-n", ns.name, "link", "del", VXLAN_DEVICE[4], check=False)
            felix = worker.run(lambda: Felix(context))
            record(("cold", "pass"), worker.run(timed, lambda: felix.apply(cold_snap)))
            record(("more", "pass"), worker.run(timed, lambda: felix.apply(more_snap)))
            want = felix.dataplane
            worker.run(felix.stop)
            assert want is not None
            cold_routes = [r for r in want.routes[4].values() if not r.blackhole]
            extra = next(r for r in cold_routes if str(r.dst) == "10.111.255.192/26")
            cold_routes.remove(extra)
            wanted = {r.dst: r for r in cold_routes}
            links = worker.run(lambda: netlink.links(netlink.IPRoute()))
            oif = links[VXLAN_DEVICE[4]].index

            # (routes) the manager alone, into an empty table, then one more.
            flush_routes()

            ipr = worker.run(netlink.IPRoute)
            manager = RouteManager(ipr)

            def program(routes: dict, resync: bool) -> Callable[[], object]:
                return lambda: manager.apply({4: routes}, links, 80, VXLAN_DEVICE.values(), resync)

            record(("cold", "routes"), worker.run(timed, program(wanted, True)))
            more = {**wanted, extra.dst: extra}
            record(("more", "routes"), worker.run(timed, program(more, False)))
            worker.run(ipr.close)

            # (floor) the same routes, bare.
            flush_routes()
            record(("cold", "floor"), worker.run(timed, lambda: bare_batch(cold_routes, oif)))
            record(("more", "floor"), worker.run(timed, lambda: bare_batch([extra], oif)))
            count = len(
                sh("ip", "-n", ns.name, "route", "show", "dev", VXLAN_DEVICE[4]).stdout.splitlines()
            )
            if count != len(cold_routes) + 1:
                raise BenchFailure(
                    f"the floor programmed {count} routes, not {len(cold_routes) + 1}"
                )

        for _ in range(rounds):
            one_round()
        report = Report(
            "route programming (1,000 remote VXLAN blocks)",
            {"floor": "bare netlink batch, stdlib", "routes": "Felix's route manager (pyroute2)",
             "pass": "a whole Felix pass (model, device, FDB, routes, NAT, MTU)"},
            {"rounds": rounds, "remote_nodes": NODES, "blocks": NODES * BLOCKS_PER_NODE},
        )  # fmt: skip
        for case, title in (("cold", "1,000 routes from cold"), ("more", "one more route")):
            report.rows.append(
                Row(title + " (median)", "ms",
                    {c: statistics.median(times[(case, c)]) for c in ("floor", "routes", "pass")})
            )  # fmt: skip
            report.rows.append(
                Row(
                    title + " (min)",
                    "ms",
                    {c: min(times[(case, c)]) for c in ("floor", "routes", "pass")},
                )
            )
        return report
    finally:
        if worker is not None:
            worker.close()
        ns.delete()
        fabric.delete()
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=5)
    args = parser.parse_args()
    return publish("route_bench", "route-bench", lambda: run(args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
