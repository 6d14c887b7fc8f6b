"""Routes survive what happens to a node: BIRD killed, the daemon killed with -9 and
restarted, a route deleted by hand, the datastore (etcd) down and back. A watch of every
node's routing table (`ip monitor route`) proves that no `proto bird` route was removed
anywhere in between, not merely that it is back afterwards."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.etcd_fixture import EtcdCluster
from tests.harness import wait_for
from tests.node.cluster import Cluster, SimNode, proc_alive
from tests.node.conftest import ClusterFactory


@contextmanager
def no_route_removed(nodes: list[SimNode]) -> Iterator[None]:
    """Fails if any node's kernel loses a `proto bird` route inside the block."""
    monitors = {
        node.name: subprocess.Popen(
            ["ip", "-n", node.netns.name, "monitor", "route"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in nodes
    }
    time.sleep(0.3)  # the monitors subscribe
    try:
        yield
    finally:
        removed = []
        for name, monitor in monitors.items():
            monitor.send_signal(signal.SIGTERM)
            out, _ = monitor.communicate(timeout=30)
            removed += [
                f"{name}: {line}"
                for line in out.splitlines()
                if line.startswith("Deleted") and "proto bird" in line
            ]
    assert not removed, "routes removed:\n" + "\n".join(removed)


def three_node_cluster(cluster: Cluster) -> list[SimNode]:
    nodes = [cluster.add_node() for _ in range(3)]
    for node in nodes:
        node.add_pod()
    cluster.wait(lambda: not cluster.routing_problems(), "routes")
    cluster.wait(lambda: all(len(cluster.established(n)) == 2 for n in nodes), "sessions")
    return nodes


def test_bird_and_daemon_killed_and_route_deleted(clusters: ClusterFactory) -> None:
    cluster = clusters()
    nodes = three_node_cluster(cluster)
    victim = nodes[0]
    routes = {node.name: node.bird_routes() for node in nodes}

    # BIRD killed: calico-node starts a new one; nobody loses a route meanwhile.
    old_bird = victim.bird_pid()
    assert old_bird is not None
    with no_route_removed(nodes):
        subprocess.run(["kill", "-9", str(old_bird)], check=True)
        wait_for(lambda: victim.bird_pid() not in (None, old_bird), "a new BIRD")
        cluster.wait(lambda: all(len(cluster.established(n)) == 2 for n in nodes), "sessions again")
    assert "exited (signal 9); restarting it" in victim.log()
    assert {n.name: n.bird_routes() for n in nodes} == routes

    # calico-node killed with -9 and started again: BIRD runs on, adopted; nothing moves.
    bird = victim.bird_pid()
    with no_route_removed(nodes):
        victim.kill()
        assert victim.proc is not None and victim.proc.returncode == -signal.SIGKILL
        assert bird is not None and proc_alive(bird)
        victim.start()
        cluster.wait(lambda: victim.calico_node("-felix-ready").returncode == 0, "the daemon ready")
    assert victim.bird_pid() == bird
    assert f"Adopted the running BIRD (pid {bird})" in victim.log()
    assert {n.name: n.bird_routes() for n in nodes} == routes

    # A route deleted by hand comes back (BIRD's kernel scan), on a peer and at home.
    peer_route = next(
        dst for dst, r in nodes[1].bird_routes().items() if r.get("gateway") == victim.ip
    )
    subprocess.run(["ip", "-n", nodes[1].netns.name, "route", "del", peer_route], check=True)
    own = next(dst for dst, r in victim.bird_routes().items() if r.get("type") == "blackhole")
    subprocess.run(["ip", "-n", victim.netns.name, "route", "del", "blackhole", own], check=True)
    cluster.wait(
        lambda: not cluster.routing_problems(), f"routes back: {cluster.routing_problems()}"
    )


def test_etcd_down_and_back(module_etcd: EtcdCluster, etcd_clusters: ClusterFactory) -> None:
    cluster = etcd_clusters()
    nodes = three_node_cluster(cluster)
    routes = {node.name: node.bird_routes() for node in nodes}
    with no_route_removed(nodes):
        module_etcd.stop()
        for node in nodes:
            cluster.wait(lambda n=node: "datastore watch lost" in n.log(), f"{node.name} to notice")
        not_ready = nodes[0].calico_node("-felix-ready")
        assert not_ready.returncode == 1
        assert "not in sync with the datastore" in not_ready.stdout
        # A node starting now waits for the datastore instead of failing.
        late = cluster.add_node(start=False)
        late.start(wait=False)
        cluster.wait(lambda: "datastore not reachable" in late.log(), "the late node to wait")
        time.sleep(3)  # a while without the datastore
        assert {n.name: n.bird_routes() for n in nodes} == routes
        for member in module_etcd.members:
            member.restart()
        for node in nodes:
            cluster.wait(
                lambda n=node: n.calico_node("-felix-ready").returncode == 0, "ready again"
            )
    late.wait_started()
    cluster.wait(lambda: all(len(cluster.established(n)) == 3 for n in cluster.nodes), "4 nodes")
    # Re-synced: a change made now reaches every node.
    cluster.add_pool("after", "10.245.0.0/16")
    nodes[1].add_pod({"type": "calico-ipam", "ipv4_pools": ["after"]})
    assert "10.245." in str(cluster.affine_blocks())
    cluster.wait(
        lambda: not cluster.routing_problems(), f"after recovery: {cluster.routing_problems()}"
    )
