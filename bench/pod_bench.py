"""Pod-to-pod throughput and latency: same node, routed across nodes (BIRD, no
encapsulation), and VXLAN across nodes, side by side, so the encapsulation's cost shows.

Two simulated clusters (tests/node/cluster.py: a fabric netns, node netns each running the
built calico-node, pods made by the calico CNI plugin with the MTU calico-node writes):
one with BIRD and a plain pool, one with CALICO_NETWORKING_BACKEND=vxlan and a vxlanMode
Always pool. Throughput is Debian's iperf3 (TCP, one stream, receiver's figure); latency is
ping's average round trip over 200 echoes 10 ms apart. The three cases are interleaved per
round; the table shows medians, the reference column is the same-node case.

Run as root after `make build`: .venv/bin/python bench/pod_bench.py [-n 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import time

from cni_bench import BenchFailure, Report, Row, publish

from tests.harness import wait_for
from tests.node.cluster import Cluster, Pod

PORT = 5201
CASES = {
    "same": "same node",
    "routed": "across nodes, routed (BIRD, no encapsulation)",
    "vxlan": "across nodes, VXLAN",
}


def pod_cmd(pod: Pod, *argv: str) -> list[str]:
    return ["nsenter", f"--net={pod.netns.path}", *argv]


def throughput(client: Pod, server: Pod, seconds: int) -> float:
    """Gbit/s from client to server (a try that fails, e.g. before the server listens, is
    tried again for up to 30 s)."""
    daemon = subprocess.Popen(
        pod_cmd(server, "iperf3", "-s", "-B", server.ip, "-p", str(PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    argv = pod_cmd(client, "iperf3", "-c", server.ip, "-p", str(PORT), "-t", str(seconds), "-J")
    try:
        deadline = time.monotonic() + 30
        while True:
            run = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + 60, check=False
            )
            try:
                return json.loads(run.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
            except (ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise BenchFailure(
                        f"iperf3 {client.ip} -> {server.ip}: {run.stdout[-500:]}"
                    ) from None
            time.sleep(0.2)
    finally:
        daemon.kill()
        daemon.wait(30)


def latency(client: Pod, server: Pod) -> float:
    """Average round trip in microseconds."""
    run = subprocess.run(
        pod_cmd(client, "ping", "-q", "-c", "200", "-i", "0.01", server.ip),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    match = re.search(r"= [\d.]+/([\d.]+)/", run.stdout)
    if run.returncode != 0 or match is None:
        raise BenchFailure(f"ping {client.ip} -> {server.ip}: {run.stdout[-500:]}")
    return float(match[1]) * 1000


def two_nodes(cluster: Cluster, **env: str) -> tuple[Pod, Pod, Pod]:
    """Two nodes; pods: two on the first, one on the second; all reaching each other."""
    first, second = cluster.add_node(**env), cluster.add_node(**env)
    pods = (first.add_pod(), first.add_pod(), second.add_pod())
    wait_for(lambda: pods[0].ping(pods[2].ip) and pods[2].ping(pods[0].ip), "pods to reach", 120)
    return pods


def run(rounds: int, seconds: int) -> Report:
    for tool in ("iperf3", "ping"):
        if shutil.which(tool) is None:
            raise BenchFailure(f"{tool} is missing (scripts/install-deps test installs it)")
    clusters = [Cluster.local(pod_mtu=None), Cluster.local(pod_mtu=None)]
    try:
        routed = two_nodes(clusters[0])
        vxlan = two_nodes(
            clusters[1], CALICO_NETWORKING_BACKEND="vxlan", CALICO_IPV4POOL_VXLAN="Always"
        )
        pairs = {
            "same": (routed[0], routed[1]),
            "routed": (routed[0], routed[2]),
            "vxlan": (vxlan[0], vxlan[2]),
        }
        gbits: dict[str, list[float]] = {case: [] for case in CASES}
        micros: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(rounds):
            for case, (client, server) in pairs.items():
                gbits[case].append(throughput(client, server, seconds))
                micros[case].append(latency(client, server))
        mtus = {
            "routed": (clusters[0].nodes[0].lib_dir / "mtu").read_text(),
            "vxlan": (clusters[1].nodes[0].lib_dir / "mtu").read_text(),
        }
        report = Report(
            "pod-to-pod throughput and latency",
            CASES,
            {"rounds": rounds, "seconds": seconds, "pod_mtu": mtus},
        )
        report.rows.append(Row("TCP throughput", "Gbit/s",
                               {c: statistics.median(v) for c, v in gbits.items()}))  # fmt: skip
        report.rows.append(Row("round trip", "us",
                               {c: statistics.median(v) for c, v in micros.items()}))  # fmt: skip
        report.notes.append(f"pod MTU: routed {mtus['routed']}, VXLAN {mtus['vxlan']}")
        return report
    finally:
        for cluster in clusters:
            cluster.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    return publish("pod_bench", "pod-bench", lambda: run(args.rounds, args.seconds))


if __name__ == "__main__":
    raise SystemExit(main())
